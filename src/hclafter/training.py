"""Stage 2: tuning the image side, phase by phase, with checkpoint selection on validation."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

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


def set_trainable(groups: dict[str, dict[str, nn.Parameter]], trained: set[str]) -> None:
    for name, params in groups.items():
        for p in params.values():
            p.requires_grad_(name in trained)


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


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                accelerator: Accelerator, cfg: Config, consistency: bool, desc: str, progress: bool) -> dict:
    """One pass over the training data; returns mean losses and training accuracy."""
    model.train()
    sums = {"loss": 0.0, "task_loss": 0.0, "consistency_loss": 0.0, "correct": 0.0, "n": 0}
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for batch in bar:
        with accelerator.autocast():
            out = model.forward_stages(batch["image"])
            task = task_loss(cfg.train.loss, out.logits, batch["label"], batch["distribution"])
            cons = stage_consistency_loss(out.stage_logits) if consistency else torch.zeros((), device=task.device)
            loss = task + cfg.train.consistency_weight * cons
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} in {desc}")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        n = batch["label"].shape[0]
        sums["loss"] += loss.item() * n
        sums["task_loss"] += task.item() * n
        sums["consistency_loss"] += cons.item() * n
        sums["correct"] += (out.logits.argmax(-1) == batch["label"]).sum().item()
        sums["n"] += n
        bar.set_postfix(loss=f"{loss.item():.4f}")
    totals = accelerator.reduce(torch.tensor([sums[k] for k in ("loss", "task_loss", "consistency_loss", "correct", "n")],
                                             device=accelerator.device, dtype=torch.float64), reduction="sum")
    loss_sum, task_sum, cons_sum, correct, count = totals.tolist()
    return {"train_loss": loss_sum / count, "train_task_loss": task_sum / count,
            "train_consistency_loss": cons_sum / count, "train_accuracy": correct / count}
