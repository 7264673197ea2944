"""What stage 2 optimises and how fast: parameter groups, the phase schedule of groups, AdamW
with a learning rate per group, and the warm-up + cosine schedule.

Every tunable parameter belongs to one group of ``PARAM_GROUPS``; a phase trains some groups
(``phase_groups``), and what any phase trains (``tuned_groups``) gets an optimizer entry, is saved
with the run and counts as trained.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..core.config import PARAM_GROUPS, Config, PhaseConfig, tuned_groups
from ..models import StagedClassifier, run_groups

Groups = dict[str, dict[str, nn.Parameter]]  # group → parameter name → parameter


def param_groups(model: nn.Module) -> Groups:
    """Every tunable parameter by group name (see ``config.PARAM_GROUPS``), keyed by parameter name."""
    groups = model.param_groups()
    named = dict(model.named_parameters())
    covered = [n for params in groups.values() for n in params]
    if sorted(covered) != sorted(named) or set(groups) - set(PARAM_GROUPS):
        raise RuntimeError(f"{type(model).__name__}.param_groups() must assign each parameter to exactly one "
                           f"of {PARAM_GROUPS}")
    return {g: groups.get(g, {}) for g in PARAM_GROUPS}


def set_trainable(model: StagedClassifier, groups: Groups, trained: set[str],
                  stages: Optional[Sequence[int]] = None) -> None:
    """Train exactly the ``trained`` groups; with ``stages``, only those stages' own parameters
    among them (shared parameters of a trained group always train)."""
    for group, params in groups.items():
        for name, p in params.items():
            stage = model.stage_of_parameter(name) if stages is not None else None
            p.requires_grad_(group in trained and (stage is None or stage in stages))


def phase_of_epoch(phases: list[PhaseConfig]) -> list[tuple[int, PhaseConfig]]:
    """(phase number, phase) for every epoch, in order."""
    return [(i, p) for i, p in enumerate(phases, start=1) for _ in range(p.epochs)]


def _no_decay(group: str, param: nn.Parameter) -> bool:
    """No weight decay on prompts and on vectors and scalars: biases, LayerNorms, σ, β."""
    return group == "prompts" or param.ndim < 2


def build_optimizer(groups: Groups, cfg: Config) -> torch.optim.AdamW:
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


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each parameter group, by group name."""
    return {g["group"]: g["lr"] for g in optimizer.param_groups}


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to zero at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def saved_parameter_names(model: StagedClassifier, cfg: Config) -> list[str]:
    """What a run stores: every parameter outside the frozen tower, the tower parts the run tunes, and
    the persistent buffers outside the tower (values a fit or a selection on validation set)."""
    groups = param_groups(model)
    tuned = run_groups(cfg)
    keep = [g for g in PARAM_GROUPS if g not in ("layernorms", "backbone") or g in tuned]
    buffers = set(model.state_dict()) - {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return sorted({name for g in keep for name in groups[g]} | {b for b in buffers if not b.startswith("visual.")})


def trained_parameters(model: StagedClassifier, groups: Groups, cfg: Config) -> dict:
    """Parameter counts: ``trained``, those that receive a gradient in some phase or that a fit sets
    (the run's groups' parameters less the model's inert ones); ``added``, the trained ones outside the
    CLIP tower; ``by_group``, every group's size."""
    inert = model.inert_parameters()
    tuned = run_groups(cfg)
    trained = {g: sum(p.numel() for n, p in groups[g].items() if n not in inert) for g in tuned}
    return {"trained": sum(trained.values()),
            "added": sum(n for g, n in trained.items() if g not in ("layernorms", "backbone")),
            "by_group": {g: sum(p.numel() for p in params.values()) for g, params in groups.items()}}
