"""Stage 2, the training loop, in the order it runs: ``fit`` goes through the rounds of the
schedule; ``train_round`` runs the round's steps (``train_step``: forward, losses, backward,
optimizer); ``end_round`` validates, keeps the weights that are best on validation and saves the
resumable state. A round is the training between two validations (``optim.training_rounds``): an
epoch when the budget is in epochs; with ``train.steps``, cut also at phase ends and every tenth
of the budget. Everything the loop reads and updates is one :class:`TrainState`.

The state is saved atomically at phase ends, when validation improves, at a round's end once
``train.state_every_s`` seconds have passed since the last save, every ``train.checkpoint_every_steps``
steps and on a signal; a resumed run continues from it and ends with the same summary as an
uninterrupted one (the rounds after the saved state are trained again, identically).
"""
from __future__ import annotations

import dataclasses
import itertools
import shlex
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import skip_first_batches
from torch import nn
from torch.utils.data import DataLoader

from ..core.checkpoint import load_state, save_checkpoint, save_state
from ..core.config import Config, PhaseConfig, phase_groups
from ..core.emotions import Wheel
from ..core.files import RunError, writing
from ..core.metrics import HEADLINE
from ..core.progress import bar, interactive, say
from ..core.runtime import Runtime
from ..data import make_loader
from ..data.store import InputView
from ..models import LabelledFeatures, StagedClassifier, phase_reads_features
from ..models.losses import stage_consistency_loss, stage_distillation_loss, task_loss
from .evaluation import Predictions, compute_metrics, predict
from .inputs import encode_split
from .optim import Groups, Round, learning_rates, set_trainable, training_rounds
from .runfiles import append_record, write_records
from .tracking import log_round, log_step, sigmas

SUM_KEYS = ("loss", "task_loss", "consistency_loss", "distill_loss", "correct", "n")
# The run's files a resume reads besides the state: their sha256 is saved with it.
RESUME_READS = ("model.safetensors", "text_classifier.safetensors", "checkpoints/stage1.json",
                "teacher_logits.safetensors")


def fit(state: TrainState, stop: dict) -> None:
    """Train every remaining round; after each, validate, keep the best weights (on val) and save when due.
    ``stop["signum"]``, set by a signal handler, ends the run at the next step with its state saved."""
    rounds, p = state.rounds, state.progress
    if state.resumed and state.main:
        say(f"resuming {state.out_dir} at {_position(state)} ({p.global_step} steps done)")
    try:
        while p.rounds_done < len(rounds):
            r = rounds[p.rounds_done]
            groups = phase_groups(r.phase, state.cfg.train.train_backbone)
            set_trainable(state.plain, state.groups, groups, r.phase.stages)
            state.read_inputs_of(r.phase_no, groups)
            started = time.time()
            train_stats = train_round(state, r, stop)
            end_round(state, r, train_stats, time.time() - started)
    finally:
        state.read_inputs_of(None)


def train_round(state: TrainState, r: Round, stop: dict) -> dict[str, float]:
    """The round's steps (from where a resumed run stopped); returns the round's mean losses."""
    p, cfg = state.progress, state.cfg
    state.plain.train()
    done = r.first + p.step_in_round  # batches of this pass already trained on
    loader = skip_first_batches(state.loaders["train"], done) if done else state.loaders["train"]
    # accelerate's loader re-seeds its sampler with its own epoch counter on every pass: keep both
    # at the pass's number, so the order depends on (seed, pass) only, also after a resume.
    loader.set_epoch(r.epoch)
    state.train_sampler.set_epoch(r.epoch)
    batches = bar(itertools.islice(loader, r.steps - p.step_in_round), state.round_name(r), state.show,
                  total=r.steps, initial=p.step_in_round)
    for batch in batches:
        if state.view is not None and not state.from_features:
            batch["image"] = state.view(batch["image"], train=True)
        try:
            step = train_step(state, batch, r.phase)
        except NonFiniteError as e:
            if cfg.train.on_nonfinite != "skip":
                raise RunError(f"{e}. Stopped; the last good state (step {p.global_step - p.step_in_round} or later) "
                               f"is saved in {state.out_dir}/checkpoints; fix the data or lower the learning rate, "
                               "then --resume (or set train.on_nonfinite=skip)") from None
            p.skipped_batches.append(str(e))
        else:
            for key in SUM_KEYS:
                p.sums[key] += step[key]
            n = max(step["n"], 1.0)
            batches.set_postfix(loss=f"{step['loss'] / n:.4f}")
            log_step(state.runtime, p.global_step + 1, {k: step[k] / n for k in ("loss", "task_loss", "consistency_loss")},
                     learning_rates(state.optimizer))
        p.step_in_round += 1
        p.global_step += 1
        every = cfg.train.checkpoint_every_steps
        if (every and p.global_step % every == 0) or stop["signum"] is not None:
            state.save()
        if stop["signum"] is not None:
            raise TrainingInterrupted(f"interrupted by signal {stop['signum']} in {state.round_name(r)}, step "
                                      f"{p.step_in_round}; state saved. Continue with: {state.resume_command()}",
                                      stop["signum"])
    return epoch_stats(p.sums, state.runtime)


def train_step(state: TrainState, batch: dict, phase: PhaseConfig) -> dict[str, float]:
    """One optimisation step: forward, the losses, backward, the optimizer and schedule. A
    non-finite loss or gradient raises NonFiniteError before the optimizer touches the weights, so
    the model stays at its last good values. Returns the batch's summed losses and correct count."""
    cfg, runtime = state.cfg, state.runtime
    labels, keep = _targets(state, batch)
    with runtime.autocast():
        out = state.model(batch["image"], return_stages=True, from_features=state.from_features)
        logits, stage_logits, dists = out.logits, out.stage_logits, batch["distribution"]
        if keep is not None:
            logits, stage_logits, dists, labels = logits[keep], stage_logits[:, keep], dists[keep], labels[keep]
        task, cons, distill = _loss_terms(state, batch, logits, stage_logits, dists, labels, keep, phase.consistency)
        loss = task + cfg.train.consistency_weight * cons + cfg.train.distill.weight * distill
    state.optimizer.zero_grad(set_to_none=True)
    problem = f"loss {loss.item()}" if not torch.isfinite(loss) else _backward(state, loss)
    if problem is not None:
        state.optimizer.zero_grad(set_to_none=True)
        images = [state.train_paths[i] for i in batch["index"].tolist()]
        raise NonFiniteError(f"non-finite {problem} on a batch of {len(images)} images: "
                             + ", ".join(images[:8]) + (" ..." if len(images) > 8 else ""))
    runtime.grad_scaler.step(state.optimizer)
    runtime.grad_scaler.update()
    state.scheduler.step()
    n = len(labels)
    return {"loss": loss.item() * n, "task_loss": task.item() * n, "consistency_loss": cons.item() * n,
            "distill_loss": distill.item() * n, "correct": float((logits.argmax(-1) == labels).sum().item()),
            "n": float(n)}


def _targets(state: TrainState, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The batch's labels, and which of its images count (None: all). In pseudo-label training the
    batch's own labels are never read: targets are the teacher's labels of the images it is
    confident about."""
    if state.pseudo is None:
        return batch["label"], None
    index = batch["index"].to(state.pseudo[0].device)
    device = batch["image"].device
    return state.pseudo[0][index].to(device), state.pseudo[1][index].to(device)


def _loss_terms(state: TrainState, batch: dict, logits: torch.Tensor, stage_logits: torch.Tensor,
                dists: torch.Tensor, labels: torch.Tensor, keep: Optional[torch.Tensor],
                consistency: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The task loss, the stage-consistency loss (when the phase says so) and, with
    ``train.distill.teacher``, the stages' distillation from the teacher: the fused prediction
    (detached) or a finished run's logits per training image."""
    cfg = state.cfg.train
    if not len(labels):  # a batch the pseudo-label teacher is unsure about throughout
        zero = logits.sum() * 0.0
        return zero, torch.zeros((), device=zero.device), torch.zeros((), device=zero.device)
    task = task_loss(cfg.loss, logits, labels, dists)
    cons = stage_consistency_loss(stage_logits) if consistency else torch.zeros((), device=task.device)
    distill = torch.zeros((), device=task.device)
    if cfg.distill.teacher is not None:
        teacher = state.teacher
        target = logits if teacher is None else teacher[batch["index"].to(teacher.device)].to(logits.device)
        if keep is not None and teacher is not None:
            target = target[keep]
        distill = stage_distillation_loss(stage_logits, target, cfg.distill.temperature)
    return task, cons, distill


def _backward(state: TrainState, loss: torch.Tensor) -> Optional[str]:
    """Backpropagate ``loss``; "gradient" if a gradient is not finite (under fp16 the scaler skips
    such steps by design), else None."""
    runtime = state.runtime
    runtime.backward(loss)
    runtime.grad_scaler.unscale_(state.optimizer)
    grads = [p.grad for group in state.optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads and not runtime.grad_scaler.is_enabled() \
            and not torch.isfinite(torch.stack([g.detach().float().abs().max() for g in grads])).all():
        return "gradient"
    return None


def end_round(state: TrainState, r: Round, train_stats: dict[str, float], seconds: float) -> None:
    """Validate, log the round, keep the weights if they are the best on val so far, save the state when due."""
    p = state.progress
    # What the model's predictions mix (Tip-Adapter-F's α, β; CLIP-Adapter's ratio), chosen on val first.
    chosen = state.plain.select(state.val_features) if state.val_features is not None else {}
    # The round's line reports validation, so no separate line for it when stderr is not a terminal.
    val, val_preds = state.evaluate("val", progress=state.show and interactive())
    epochs = state.epochs_of(r.end)
    p.records.append({"epoch": epochs, "step": r.end, "phase": r.phase_no, **train_stats,
                      "val_loss": state.loss_of(val_preds), **summary_scalars(val, "val"),
                      "val_stage_accuracy": val.get("stage_accuracy"), "lr": learning_rates(state.optimizer),
                      "nga_weights": state.plain.nga_weights(), "fusion_weights": state.plain.fusion_weights(),
                      "time_s": seconds, **({"selection": chosen} if chosen else {})})
    best = val["accuracy"] > p.best_accuracy
    if best:
        p.best_accuracy, p.best_epoch, p.best_step, p.best_val = val["accuracy"], epochs, r.end, val
        p.best_selection = {**state.selection, **chosen}
        state.best_val_predictions = val_preds
        state.save_weights("model.safetensors")
    p.rounds_done, p.step_in_round, p.sums = p.rounds_done + 1, 0, dict.fromkeys(SUM_KEYS, 0.0)
    if best or state.save_due(r):
        state.save()
    if state.main:
        append_record(state.out_dir, p.records[-1])
        rec = p.records[-1]
        say(f"{state.round_name(r)}: train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f} | val loss "
            f"{rec['val_loss']:.4f} acc {rec['val_accuracy']:.4f} macro-F1 {rec['val_macro_f1']:.4f} | {seconds:.1f} s"
            + ("  (best so far)" if best else ""))
    log_round(state.runtime, p.global_step, p.records[-1], sigmas(state.groups["nga"].items()))
    if state.on_validation is not None:
        state.on_validation(r.end, state.rounds[-1].end, val)


# --- what the loop works on ---------------------------------------------------------------------


@dataclass
class Progress:
    """Where training stands; with the tensors it is everything a resumed run needs."""

    rounds_done: int = 0
    step_in_round: int = 0  # optimisation steps done in the current round
    global_step: int = 0
    sums: dict = field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))
    skipped_batches: list = field(default_factory=list)
    best_accuracy: float = -1.0
    best_epoch: float = 0  # epochs (passes over the training set) done at the selected validation
    best_step: int = 0
    best_val: Optional[dict] = None
    best_selection: dict = field(default_factory=dict)  # the model's choices on val behind the best weights
    records: list = field(default_factory=list)


@dataclass(kw_only=True)
class TrainState:
    """One stage-2 training: what the loop reads and updates."""

    cfg: Config
    out_dir: Path
    runtime: Runtime
    model: nn.Module  # as prepared by accelerate (DDP-wrapped under several processes), compiled by train.compile
    plain: StagedClassifier  # the same model unwrapped
    groups: Groups
    saved_names: list[str]  # the parameters a run stores
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loaders: dict[str, DataLoader]
    train_sampler: Any  # the training loader's EpochSampler
    train_paths: list[str]  # the training images, to name them in errors
    wheel: Wheel
    identity: dict  # the backbone's, stored with every checkpoint
    fingerprint: dict  # the run's config and splits, stored with every saved state
    from_features: bool = False  # the loaders give cached layer features instead of images
    view: Optional[InputView] = None  # turns image-store batches into model inputs
    selection: dict = field(default_factory=dict)  # the choices of the model's fit before training
    val_features: Optional[LabelledFeatures] = None  # what the model's ``select`` reads after each epoch
    pseudo: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (teacher label, kept) per training image
    teacher: Optional[torch.Tensor] = None  # a finished run's logits per training image (train.distill)
    show: bool = True  # progress bars and evaluation lines
    # Told (steps done, steps in all, validation metrics) after each round (a tuner's pruner: it may raise; a
    # pruned trial is never resumed, so the saved state may be older).
    on_validation: Optional[Callable[[int, int, dict], None]] = None
    progress: Progress = field(default_factory=Progress)
    resumed: bool = False  # the progress was loaded from a saved state
    # The selected weights' validation predictions, while this process has them (not after a resume).
    best_val_predictions: Optional[Predictions] = None
    saved_at: float = field(default_factory=time.monotonic)  # when the state was last saved (or the loop set up)
    # While the train and val loaders give a phase's encoded images: that phase, and the image loaders and sampler.
    encoded: Optional[tuple[int, dict[str, DataLoader], Any]] = None

    @property
    def main(self) -> bool:
        return self.runtime.is_main_process

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders["train"])

    @cached_property
    def rounds(self) -> list[Round]:
        return training_rounds(self.cfg.train, self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.rounds[-1].end

    def epochs_of(self, steps: int) -> float:
        """Passes over the training set in ``steps`` steps: a whole number whenever it is one."""
        epochs = steps / self.steps_per_epoch
        return int(epochs) if epochs.is_integer() else round(epochs, 3)

    def round_name(self, r: Round) -> str:
        """A round in words: its epoch with a budget in epochs (where each round is one), else its steps."""
        if self.cfg.train.steps is None:
            return f"epoch {r.epoch + 1}/{len(self.rounds)} (phase {r.phase_no})"
        steps = f"step {r.end}" if r.steps == 1 else f"steps {r.end - r.steps + 1}-{r.end}"
        return f"{steps} of {self.total_steps} (phase {r.phase_no})"

    def read_inputs_of(self, phase_no: Optional[int], groups: frozenset[str] | set[str] = frozenset()) -> None:
        """Make the loaders those of phase ``phase_no`` training ``groups`` (None: of the test after
        training). A phase whose training leaves each image's features unchanged
        (``models.phase_reads_features``) encodes the training and validation images once when it
        starts, and its steps and validations read those features: the same numbers, without running
        the image tower each time. Runs reading the feature cache already, and every other phase,
        read what the run prepared."""
        reads_images = self.encoded is not None or not self.from_features
        encode = phase_no is not None and reads_images and phase_reads_features(self.cfg, set(groups))
        if (phase_no if encode else None) == (self.encoded[0] if self.encoded else None):
            return
        if self.encoded is not None:
            (_, self.loaders, self.train_sampler), self.encoded = self.encoded, None
            self.from_features = False
        if encode:
            images = (self.loaders, self.train_sampler)
            data = self.cfg.data
            train, val = (encode_split(self.plain, self.loaders[s].dataset, self.view, data.eval_batch_size,
                                       self.runtime) for s in ("train", "val"))
            train_loader = make_loader(train, data.batch_size, shuffle=True, seed=self.cfg.seed)
            self.train_sampler = train_loader.sampler
            self.loaders = {**self.loaders, "train": self.runtime.prepare_data_loader(train_loader),
                            "val": self.runtime.prepare_data_loader(make_loader(val, data.eval_batch_size, False, 0))}
            self.from_features, self.encoded = True, (phase_no, *images)

    def classify(self, inputs: torch.Tensor, images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused and per-stage logits of the loaders' inputs, or of ``images`` when the loaders give
        cached features."""
        features = self.from_features and not images
        if self.view is not None and not features:
            inputs = self.view(inputs, train=False)
        with self.runtime.autocast():
            out = self.plain(inputs, return_stages=True, from_features=features)
        return out.logits, out.stage_logits

    def evaluate(self, split: str, progress: Optional[bool] = None) -> tuple[dict, Predictions]:
        """Metrics and predictions of the current weights on a split (``progress``: default ``show``)."""
        self.plain.eval()
        preds = predict(self.classify, self.loaders[split], self.runtime, desc=f"eval {split}",
                        progress=self.show if progress is None else progress)
        return compute_metrics(preds, self.wheel), preds

    def loss_of(self, preds: Predictions) -> float:
        """The task loss (without consistency) of predictions, e.g. the validation loss of a round."""
        return task_loss(self.cfg.train.loss, torch.from_numpy(preds.logits), torch.from_numpy(preds.labels).long(),
                         torch.from_numpy(preds.distributions)).item()

    def resume_command(self) -> str:
        """The command that continues this run (the same launcher when it runs on several processes)."""
        command = f"hclafter train --out {shlex.quote(str(self.out_dir))} --resume"
        if self.runtime.num_processes > 1:
            command += f" (through the same launcher, with {self.runtime.num_processes} processes)"
        return command

    def save_due(self, r: Round) -> bool:
        """Whether the state is saved at the end of round ``r`` (besides an improvement on validation):
        at the end of its phase, or once ``train.state_every_s`` have passed since the last save."""
        done = self.progress.rounds_done
        phase_ends = done == len(self.rounds) or self.rounds[done].phase_no != r.phase_no
        return phase_ends or time.monotonic() - self.saved_at >= self.cfg.train.state_every_s

    def save(self) -> None:
        """The resumable state, written by the first process while the others wait."""
        self.saved_at = time.monotonic()
        if self.main:
            with writing(self.out_dir / "checkpoints", self.out_dir):
                save_state(self.out_dir / "checkpoints", self.progress.global_step, self.plain, self.saved_names,
                           self.optimizer, self.scheduler, dataclasses.asdict(self.progress), self.identity,
                           self.fingerprint, [name for name in RESUME_READS if (self.out_dir / name).is_file()])
        self.runtime.wait_for_everyone()

    def load(self) -> None:
        self.progress = Progress(**load_state(self.out_dir / "checkpoints", self.plain, self.optimizer,
                                              self.scheduler, self.identity))
        self.resumed = True

    def save_weights(self, name: str) -> None:
        if self.main:
            state = self.plain.state_dict()
            with writing(self.out_dir / name, self.out_dir):
                save_checkpoint(self.out_dir / name, {n: state[n].float() for n in self.saved_names}, self.identity)

    def rewrite_log(self) -> None:
        """metrics.jsonl from the saved records (so a torn last line of a killed run is repaired)."""
        if self.main:
            write_records(self.out_dir, self.progress.records)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; names the batch's images."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def epoch_stats(sums: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Mean losses and accuracy over the round, summed across processes."""
    totals = runtime.reduce(torch.tensor([sums[k] for k in SUM_KEYS], device=runtime.device, dtype=torch.float64),
                            reduction="sum")
    loss, task, cons, distill, correct, count = totals.tolist()
    count = max(count, 1.0)
    return {"train_loss": loss / count, "train_task_loss": task / count, "train_consistency_loss": cons / count,
            "train_distill_loss": distill / count, "train_accuracy": correct / count}


def summary_scalars(metrics: dict, prefix: str) -> dict:
    """The headline metrics of a split, flat, for metrics.jsonl."""
    out = {f"{prefix}_{k}": metrics[k] for k in HEADLINE}
    out[f"{prefix}_kl"] = metrics["ldl"]["kl"]
    return out


def _position(state: TrainState) -> str:
    """Where a saved run continues, in words."""
    p, rounds = state.progress, state.rounds
    if p.rounds_done >= len(rounds):
        return "the final test evaluation (all training done)"
    r = rounds[p.rounds_done]
    if p.step_in_round >= r.steps:
        return f"the validation of {state.round_name(r)}"
    return f"{state.round_name(r)}, step {p.step_in_round + 1} of {r.steps}"
