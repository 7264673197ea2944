"""Stage 2: tuning the image side, phase by phase, with checkpoint selection on validation."""
from __future__ import annotations

import math
import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import PARAM_GROUPS, Config, PhaseConfig
from .losses import stage_consistency_loss, task_loss
from .model import HybridCascadeLaFTer


def param_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """Every tunable parameter by group name (see ``config.PARAM_GROUPS``), keyed by parameter name."""
    groups = model.param_groups()
    named = dict(model.named_parameters())
    covered = [n for params in groups.values() for n in params]
    if sorted(covered) != sorted(named) or set(groups) - set(PARAM_GROUPS):
        raise RuntimeError(f"{type(model).__name__}.param_groups() must assign each parameter to exactly one "
                           f"of {PARAM_GROUPS}")
    return {g: groups.get(g, {}) for g in PARAM_GROUPS}


def trained_groups(phase: PhaseConfig, train_backbone: bool) -> set[str]:
    groups = set(phase.train)
    if train_backbone and "layernorms" in groups:
        groups.add("backbone")
    return groups


def saved_parameter_names(model: HybridCascadeLaFTer, cfg: Config) -> list[str]:
    """What a run stores: everything outside the frozen tower, plus the tower parts any phase tunes."""
    groups = param_groups(model)
    tuned = set().union(*(trained_groups(p, cfg.train.train_backbone) for p in cfg.train.phases))
    keep = [g for g in PARAM_GROUPS if g not in ("layernorms", "backbone") or g in tuned]
    return sorted(name for g in keep for name in groups[g])


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
    tuned = set().union(*(trained_groups(p, cfg.train.train_backbone) for p in cfg.train.phases))
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


SUM_KEYS = ("loss", "task_loss", "consistency_loss", "correct", "n")


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
               accelerator: Accelerator, cfg: Config, consistency: bool, paths: Sequence[str],
               pseudo: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, float]:
    """One optimisation step. A non-finite loss or gradient raises NonFiniteError before the
    optimizer touches the weights, so the model stays at its last good values.

    With ``pseudo`` = (teacher label, kept) per training index, the batch's own labels are never
    read: targets are the teacher's labels of the images it is confident about.
    """
    if pseudo is None:
        labels, keep = batch["label"], None
    else:
        index = batch["index"].to(pseudo[0].device)
        labels, keep = pseudo[0][index].to(batch["image"].device), pseudo[1][index].to(batch["image"].device)
    with accelerator.autocast():
        out = model(batch["image"], return_stages=True)
        logits, stage_logits, dists = out.logits, out.stage_logits, batch["distribution"]
        if keep is not None:
            logits, stage_logits, dists, labels = logits[keep], stage_logits[:, keep], dists[keep], labels[keep]
        task = task_loss(cfg.train.loss, logits, labels, dists) if len(labels) else logits.sum() * 0.0
        cons = stage_consistency_loss(stage_logits) if consistency and len(labels) else torch.zeros((), device=task.device)
        loss = task + cfg.train.consistency_weight * cons
    optimizer.zero_grad(set_to_none=True)
    what = None
    if not torch.isfinite(loss):
        what = f"loss {loss.item()}"
    else:
        accelerator.backward(loss)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().abs().max() for g in grads])).all():
            what = "gradient"
    if what is not None:
        optimizer.zero_grad(set_to_none=True)
        images = [paths[i] for i in batch["index"].tolist()]
        raise NonFiniteError(f"non-finite {what} on a batch of {len(images)} images: "
                             + ", ".join(images[:8]) + (" ..." if len(images) > 8 else ""))
    optimizer.step()
    scheduler.step()
    n = len(labels)
    return {"loss": loss.item() * n, "task_loss": task.item() * n, "consistency_loss": cons.item() * n,
            "correct": float((logits.argmax(-1) == labels).sum().item()), "n": float(n)}


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


def epoch_stats(sums: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Mean losses and accuracy over the epoch, summed across processes."""
    totals = accelerator.reduce(torch.tensor([sums[k] for k in SUM_KEYS], device=accelerator.device,
                                             dtype=torch.float64), reduction="sum")
    loss, task, cons, correct, count = totals.tolist()
    count = max(count, 1.0)
    return {"train_loss": loss / count, "train_task_loss": task / count, "train_consistency_loss": cons / count,
            "train_accuracy": correct / count}


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer as tensors (per-parameter state) and JSON (hyper-parameters per group)."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": torch.as_tensor(value) for index, entry in state["state"].items()
               for key, value in entry.items()}
    return tensors, state["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random stream: torch (CPU and CUDA) as tensors; Python and NumPy as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    return tensors, {"python": random.getstate(),
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = data["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
