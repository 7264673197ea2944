"""Stage 2: tuning the image side, phase by phase, with checkpoint selection on validation.

The loop works on a :class:`TrainState`: the prepared model, optimizer, scheduler and loaders,
and the :class:`Progress` that, with the tensors, is everything a resumed run needs. The state is
saved atomically after every epoch and every ``train.checkpoint_every_steps`` steps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torchvision.transforms as T
from accelerate import skip_first_batches
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from ..core.checkpoint import load_state, save_checkpoint, save_state
from ..core.config import PARAM_GROUPS, Config, PhaseConfig, trained_groups, tuned_groups
from ..core.emotions import Wheel
from ..core.files import RunError, atomic_write_text, writing
from ..core.metrics import HEADLINE
from ..core.progress import bar, interactive, say
from ..core.runtime import Runtime
from ..data.store import InputView
from ..models import StagedClassifier
from ..models.losses import stage_consistency_loss, stage_distillation_loss, task_loss
from .evaluation import Predictions, compute_metrics, predict
from .tracking import log_epoch, log_step, sigmas



def param_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """Every tunable parameter by group name (see ``config.PARAM_GROUPS``), keyed by parameter name."""
    groups = model.param_groups()
    named = dict(model.named_parameters())
    covered = [n for params in groups.values() for n in params]
    if sorted(covered) != sorted(named) or set(groups) - set(PARAM_GROUPS):
        raise RuntimeError(f"{type(model).__name__}.param_groups() must assign each parameter to exactly one "
                           f"of {PARAM_GROUPS}")
    return {g: groups.get(g, {}) for g in PARAM_GROUPS}


def saved_parameter_names(model: StagedClassifier, cfg: Config) -> list[str]:
    """What a run stores: everything outside the frozen tower, plus the tower parts any phase tunes."""
    groups = param_groups(model)
    tuned = tuned_groups(cfg.train)
    keep = [g for g in PARAM_GROUPS if g not in ("layernorms", "backbone") or g in tuned]
    return sorted(name for g in keep for name in groups[g])


def trained_parameters(model: StagedClassifier, groups: dict[str, dict[str, nn.Parameter]], cfg: Config) -> dict:
    """Parameter counts: ``trained``, those that receive a gradient in some phase (a tuned group's
    parameters less the model's inert ones); ``added``, the trained ones outside the CLIP tower;
    ``by_group``, every group's size."""
    inert = model.inert_parameters()
    tuned = tuned_groups(cfg.train)
    trained = {g: sum(p.numel() for n, p in groups[g].items() if n not in inert) for g in tuned}
    return {"trained": sum(trained.values()),
            "added": sum(n for g, n in trained.items() if g not in ("layernorms", "backbone")),
            "by_group": {g: sum(p.numel() for p in params.values()) for g, params in groups.items()}}


def set_trainable(model: nn.Module, groups: dict[str, dict[str, nn.Parameter]], trained: set[str],
                  stages: Optional[Sequence[int]] = None) -> None:
    """Train exactly the ``trained`` groups; with ``stages``, only those stages' own parameters
    among them (shared parameters of a trained group always train)."""
    for group, params in groups.items():
        for name, p in params.items():
            stage = model.stage_of_parameter(name) if stages is not None else None
            p.requires_grad_(group in trained and (stage is None or stage in stages))


def _no_decay(group: str, param: nn.Parameter) -> bool:
    """No weight decay on prompts and on vectors and scalars: biases, LayerNorms, σ, β."""
    return group == "prompts" or param.ndim < 2


def build_optimizer(groups: dict[str, dict[str, nn.Parameter]], cfg: Config) -> torch.optim.AdamW:
    """AdamW with a learning rate per group; no weight decay on LayerNorms, biases, prompts, σ, β."""
    tuned = tuned_groups(cfg.train)
    param_sets = []
    for group in PARAM_GROUPS:
        if group not in tuned:
            continue
        for no_decay in (False, True):
            params = [p for p in groups[group].values() if _no_decay(group, p) == no_decay]
            if params:
                param_sets.append({"params": params, "lr": cfg.train.lr[group], "group": group,
                                   "weight_decay": 0.0 if no_decay else cfg.train.weight_decay})
    return torch.optim.AdamW(param_sets)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def phase_of_epoch(phases: list[PhaseConfig]) -> list[tuple[int, PhaseConfig]]:
    """(phase number, phase) for every epoch, in order."""
    return [(i, p) for i, p in enumerate(phases, start=1) for _ in range(p.epochs)]


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; names the batch's images."""


SUM_KEYS = ("loss", "task_loss", "consistency_loss", "distill_loss", "correct", "n")


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
               accelerator: Runtime, cfg: Config, consistency: bool, paths: Sequence[str],
               pseudo: Optional[tuple[torch.Tensor, torch.Tensor]] = None, from_features: bool = False,
               teacher: Optional[torch.Tensor] = None) -> dict[str, float]:
    """One optimisation step. A non-finite loss or gradient raises NonFiniteError before the
    optimizer touches the weights, so the model stays at its last good values.

    With ``pseudo`` = (teacher label, kept) per training index, the batch's own labels are never
    read: targets are the teacher's labels of the images it is confident about. With
    ``train.distill.teacher`` set, every stage also learns the teacher's prediction: the fused one
    (detached) or ``teacher``, a finished run's logits per training index.
    """
    if pseudo is None:
        labels, keep = batch["label"], None
    else:
        index = batch["index"].to(pseudo[0].device)
        labels, keep = pseudo[0][index].to(batch["image"].device), pseudo[1][index].to(batch["image"].device)
    with accelerator.autocast():
        out = model(batch["image"], return_stages=True, from_features=from_features)
        logits, stage_logits, dists = out.logits, out.stage_logits, batch["distribution"]
        if keep is not None:
            logits, stage_logits, dists, labels = logits[keep], stage_logits[:, keep], dists[keep], labels[keep]
        task = task_loss(cfg.train.loss, logits, labels, dists) if len(labels) else logits.sum() * 0.0
        cons = stage_consistency_loss(stage_logits) if consistency and len(labels) else torch.zeros((), device=task.device)
        distill = torch.zeros((), device=task.device)
        if cfg.train.distill.teacher is not None and len(labels):
            target = logits if teacher is None else teacher[batch["index"].to(teacher.device)].to(logits.device)
            if keep is not None and teacher is not None:
                target = target[keep]
            distill = stage_distillation_loss(stage_logits, target, cfg.train.distill.temperature)
        loss = task + cfg.train.consistency_weight * cons + cfg.train.distill.weight * distill
    optimizer.zero_grad(set_to_none=True)
    what = None
    if not torch.isfinite(loss):
        what = f"loss {loss.item()}"
    else:
        accelerator.backward(loss)
        accelerator.grad_scaler.unscale_(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # Under fp16 the scaler skips steps with overflowing gradients by design.
        if grads and not accelerator.grad_scaler.is_enabled() and not torch.isfinite(torch.stack([g.detach().float().abs().max() for g in grads])).all():
            what = "gradient"
    if what is not None:
        optimizer.zero_grad(set_to_none=True)
        images = [paths[i] for i in batch["index"].tolist()]
        raise NonFiniteError(f"non-finite {what} on a batch of {len(images)} images: "
                             + ", ".join(images[:8]) + (" ..." if len(images) > 8 else ""))
    accelerator.grad_scaler.step(optimizer)
    accelerator.grad_scaler.update()
    scheduler.step()
    n = len(labels)
    return {"loss": loss.item() * n, "task_loss": task.item() * n, "consistency_loss": cons.item() * n,
            "distill_loss": distill.item() * n, "correct": float((logits.argmax(-1) == labels).sum().item()), "n": float(n)}


def strong_view(size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Callable:
    """LaFTer's strong augmentation for the student in pseudo-label training (SimSiam/MoCo-v2 style)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.GaussianBlur(kernel_size=max(3, (min(size if isinstance(size, int) else size) // 10) | 1), sigma=(0.1, 2.0)),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def epoch_stats(sums: dict[str, float], accelerator: Runtime) -> dict[str, float]:
    """Mean losses and accuracy over the epoch, summed across processes."""
    totals = accelerator.reduce(torch.tensor([sums[k] for k in SUM_KEYS], device=accelerator.device,
                                             dtype=torch.float64), reduction="sum")
    loss, task, cons, distill, correct, count = totals.tolist()
    count = max(count, 1.0)
    return {"train_loss": loss / count, "train_task_loss": task / count, "train_consistency_loss": cons / count,
            "train_distill_loss": distill / count, "train_accuracy": correct / count}


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def summary_scalars(metrics: dict, prefix: str) -> dict:
    """The headline metrics of a split, flat, for metrics.jsonl."""
    out = {f"{prefix}_{k}": metrics[k] for k in HEADLINE}
    out[f"{prefix}_kl"] = metrics["ldl"]["kl"]
    return out


@dataclass
class Progress:
    """Where training stands; with the tensors it is everything a resumed run needs."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimisation steps done in the current epoch
    global_step: int = 0
    sums: dict = field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))
    skipped_batches: list = field(default_factory=list)
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_val: Optional[dict] = None
    records: list = field(default_factory=list)


@dataclass
class TrainState:
    """One stage-2 training: what the loop reads and updates."""

    cfg: Config
    out_dir: Path
    runtime: Runtime
    model: nn.Module  # as prepared by accelerate (DDP-wrapped under several processes), compiled by train.compile
    plain: StagedClassifier  # the same model unwrapped
    groups: dict[str, dict[str, nn.Parameter]]
    saved_names: list[str]
    optimizer: Any
    scheduler: Any
    loaders: dict[str, DataLoader]
    train_sampler: Any
    train_paths: list[str]
    wheel: Wheel
    identity: dict
    from_features: bool  # the loaders give cached layer features instead of images
    pseudo: Optional[tuple[torch.Tensor, torch.Tensor]]  # (teacher label, kept) per training image
    show: bool
    teacher: Optional[torch.Tensor] = None  # a finished run's logits per training image (train.distill)
    progress: Progress = field(default_factory=Progress)
    fingerprint: Optional[dict] = None  # the run's config and splits, stored with every saved state
    resumed: bool = False  # the progress was loaded from a saved state
    inputs: Optional[InputView] = None  # turns image-store batches into model inputs

    @property
    def main(self) -> bool:
        return self.runtime.is_main_process

    @property
    def epochs(self) -> list[tuple[int, PhaseConfig]]:
        return phase_of_epoch(self.cfg.train.phases)

    def classify(self, inputs: torch.Tensor, images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused and per-stage logits of the loaders' inputs, or of ``images`` when the loaders give
        cached features."""
        if self.inputs is not None:
            inputs = self.inputs(inputs, train=False)
        with self.runtime.autocast():
            out = self.plain(inputs, return_stages=True, from_features=self.from_features and not images)
        return out.logits, out.stage_logits

    def evaluate(self, split: str, progress: Optional[bool] = None) -> tuple[dict, Predictions]:
        """Metrics and predictions of the current weights on a split (``progress``: default ``show``)."""
        self.plain.eval()
        preds = predict(self.classify, self.loaders[split], self.runtime, desc=f"eval {split}",
                        progress=self.show if progress is None else progress)
        return compute_metrics(preds, self.wheel), preds

    def loss_of(self, preds: Predictions) -> float:
        """The task loss (without consistency) of predictions, e.g. the validation loss of an epoch."""
        return task_loss(self.cfg.train.loss, torch.from_numpy(preds.logits), torch.from_numpy(preds.labels).long(),
                         torch.from_numpy(preds.distributions)).item()

    def resume_command(self) -> str:
        """The command that continues this run (the same launcher when it runs on several processes)."""
        command = f"hclafter train --out {shlex.quote(str(self.out_dir))} --resume"
        if self.runtime.num_processes > 1:
            command += f" (through the same launcher, with {self.runtime.num_processes} processes)"
        return command

    def save(self) -> None:
        """The resumable state, written by the first process while the others wait."""
        if self.main:
            with writing(self.out_dir / "checkpoints"):
                save_state(self.out_dir / "checkpoints", self.progress.global_step, self.plain, self.saved_names,
                           self.optimizer, self.scheduler, dataclasses.asdict(self.progress), self.identity,
                           self.fingerprint)
        self.runtime.wait_for_everyone()

    def load(self) -> None:
        self.progress = Progress(**load_state(self.out_dir / "checkpoints", self.plain, self.optimizer,
                                              self.scheduler, self.identity))
        # A state saved before a loss term existed sums it from zero.
        self.progress.sums = {**dict.fromkeys(SUM_KEYS, 0.0), **self.progress.sums}
        self.resumed = True

    def save_weights(self, name: str) -> None:
        if self.main:
            state = self.plain.state_dict()
            with writing(self.out_dir / name):
                save_checkpoint(self.out_dir / name, {n: state[n].float() for n in self.saved_names}, self.identity)

    def rewrite_log(self) -> None:
        """metrics.jsonl from the saved records (so a torn last line of a killed run is repaired)."""
        if self.main:
            with writing(self.out_dir / "metrics.jsonl"):
                atomic_write_text(self.out_dir / "metrics.jsonl",
                                  "".join(json.dumps(r) + "\n" for r in self.progress.records))


def _position(p: Progress, epochs: list[tuple[int, PhaseConfig]], steps_per_epoch: int) -> str:
    """Where a saved run continues, in words."""
    if p.epoch >= len(epochs):
        return "the final test evaluation (all epochs done)"
    epoch = f"epoch {p.epoch + 1}/{len(epochs)} (phase {epochs[p.epoch][0]})"
    if p.step_in_epoch >= steps_per_epoch:
        return f"the validation of {epoch}"
    return f"{epoch}, step {p.step_in_epoch + 1} of {steps_per_epoch}"


def fit(state: TrainState, stop: dict) -> None:
    """Train every remaining epoch; after each, validate, keep the best weights (on val) and save.
    ``stop["signum"]``, set by a signal handler, ends the run at the next step with its state saved."""
    epochs, p = state.epochs, state.progress
    if state.resumed and state.main:
        say(f"resuming {state.out_dir} at {_position(p, epochs, len(state.loaders['train']))} "
            f"({p.global_step} steps done)")
    while state.progress.epoch < len(epochs):
        phase_no, phase = epochs[state.progress.epoch]
        set_trainable(state.plain, state.groups, trained_groups(phase, state.cfg.train.train_backbone), phase.stages)
        started = time.time()
        train_stats = train_epoch(state, phase_no, phase, stop)
        end_epoch(state, phase_no, train_stats, time.time() - started)


def train_epoch(state: TrainState, phase_no: int, phase: PhaseConfig, stop: dict) -> dict[str, float]:
    """One epoch's steps (from where a resumed run stopped); returns the epoch's mean losses."""
    p, cfg = state.progress, state.cfg
    epoch, total = p.epoch + 1, len(state.loaders["train"])
    state.plain.train()
    loader = skip_first_batches(state.loaders["train"], p.step_in_epoch) if p.step_in_epoch else state.loaders["train"]
    # accelerate's loader re-seeds its sampler with its own epoch counter on every pass: keep both
    # at the run's epoch, so the order depends on (seed, epoch) only, also after a resume.
    loader.set_epoch(p.epoch)
    state.train_sampler.set_epoch(p.epoch)
    steps = bar(loader, f"epoch {epoch}/{len(state.epochs)} (phase {phase_no})", state.show, total=total,
                initial=p.step_in_epoch)
    for batch in steps:
        if state.inputs is not None:
            batch["image"] = state.inputs(batch["image"], train=True)
        try:
            step = train_step(state.model, batch, state.optimizer, state.scheduler, state.runtime, cfg,
                              phase.consistency, state.train_paths, state.pseudo, state.from_features, state.teacher)
            for key in SUM_KEYS:
                p.sums[key] += step[key]
            n = max(step["n"], 1.0)
            steps.set_postfix(loss=f"{step['loss'] / n:.4f}")
            log_step(state.runtime, p.global_step + 1,
                     {k: step[k] / n for k in ("loss", "task_loss", "consistency_loss")},
                     {g["group"]: g["lr"] for g in state.optimizer.param_groups})
        except NonFiniteError as e:
            if cfg.train.on_nonfinite != "skip":
                raise RunError(f"{e}. Stopped; the last good state (step {p.global_step - p.step_in_epoch} or later) "
                               f"is saved in {state.out_dir}/checkpoints; fix the data or lower the learning rate, "
                               "then --resume (or set train.on_nonfinite=skip)") from None
            p.skipped_batches.append(str(e))
        p.step_in_epoch += 1
        p.global_step += 1
        every = cfg.train.checkpoint_every_steps
        if (every and p.global_step % every == 0) or stop["signum"] is not None:
            state.save()
        if stop["signum"] is not None:
            raise TrainingInterrupted(f"interrupted by signal {stop['signum']} at epoch {epoch}, step "
                                      f"{p.step_in_epoch}; state saved. Continue with: {state.resume_command()}",
                                      stop["signum"])
    return epoch_stats(p.sums, state.runtime)


def end_epoch(state: TrainState, phase_no: int, train_stats: dict[str, float], seconds: float) -> None:
    """Validate, log the epoch, keep the weights if they are the best on val so far, save the state."""
    p = state.progress
    epoch = p.epoch + 1
    # The epoch's line reports validation, so no separate line for it when stderr is not a terminal.
    val, val_preds = state.evaluate("val", progress=state.show and interactive())
    p.records.append({"epoch": epoch, "phase": phase_no, **train_stats, "val_loss": state.loss_of(val_preds),
                      **summary_scalars(val, "val"),
                      "val_stage_accuracy": val.get("stage_accuracy"),
                      "lr": {g["group"]: g["lr"] for g in state.optimizer.param_groups},
                      "nga_weights": state.plain.nga_weights(), "fusion_weights": state.plain.fusion_weights(),
                      "time_s": seconds})
    best = val["accuracy"] > p.best_accuracy
    if best:
        p.best_accuracy, p.best_epoch, p.best_val = val["accuracy"], epoch, val
        state.save_weights("model.safetensors")
    p.epoch, p.step_in_epoch, p.sums = epoch, 0, dict.fromkeys(SUM_KEYS, 0.0)
    state.save()
    if state.main:
        with writing(state.out_dir / "metrics.jsonl"), open(state.out_dir / "metrics.jsonl", "a",
                                                            encoding="utf-8") as f:
            f.write(json.dumps(p.records[-1]) + "\n")
        r = p.records[-1]
        say(f"epoch {epoch}/{len(state.epochs)} (phase {phase_no}): train loss {r['train_loss']:.4f} "
            f"acc {r['train_accuracy']:.4f} | val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.4f} "
            f"macro-F1 {r['val_macro_f1']:.4f} | {seconds:.1f} s" + ("  (best so far)" if best else ""))
    log_epoch(state.runtime, p.global_step, p.records[-1], sigmas(state.groups["nga"].items()))
