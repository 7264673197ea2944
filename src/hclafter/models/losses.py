"""Training losses: hard-label CE variants, the dual-task loss and stage consistency."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..core.config import LossConfig


def dual_task_loss(logits: torch.Tensor, labels: torch.Tensor, distributions: torch.Tensor,
                   lam: float = 0.8, temperature: float = 1.0) -> torch.Tensor:
    """T²·KL(u ‖ softmax(z/T)) with the cooperative target u = (1−λ)·onehot(y) + λ·d (batch mean).

    At T = 1 its gradient is (softmax(z) − u)/B: one head learns label and distribution together.
    """
    onehot = F.one_hot(labels, logits.shape[-1]).to(distributions.dtype)
    target = (1 - lam) * onehot + lam * distributions
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p, target.float(), reduction="batchmean")


def stage_consistency_loss(stage_logits: torch.Tensor) -> torch.Tensor:
    """Mean over stage pairs i < j of KL(p_j ‖ p_i), from log-softmax (no log of a rounded 0)."""
    if stage_logits.shape[0] < 2:
        return stage_logits.new_zeros(())
    log_p = F.log_softmax(stage_logits.float(), dim=-1)
    pairs = list(itertools.combinations(range(stage_logits.shape[0]), 2))
    kl = [F.kl_div(log_p[i], log_p[j], reduction="batchmean", log_target=True) for i, j in pairs]
    return torch.stack(kl).mean()


def task_loss(cfg: LossConfig, logits: torch.Tensor, labels: torch.Tensor,
              distributions: torch.Tensor) -> torch.Tensor:
    """The configured task loss: ``ce``, ``ls_ce`` (label smoothing) or ``dual_task``."""
    if cfg.name == "dual_task":
        return dual_task_loss(logits, labels, distributions, cfg.lam, cfg.temperature)
    smoothing = cfg.label_smoothing if cfg.name == "ls_ce" else 0.0
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def stage_distillation_loss(stage_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 2.0) -> torch.Tensor:
    """T² · mean over stages of KL(softmax(t/T) ‖ softmax(z_s/T)) (batch mean): every stage learns
    the teacher's softened prediction (Hinton et al.'s distillation, once per stage)."""
    target = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p = F.log_softmax(stage_logits.float() / temperature, dim=-1)
    kl = [F.kl_div(log_p[s], target, reduction="batchmean", log_target=True) for s in range(stage_logits.shape[0])]
    return temperature**2 * torch.stack(kl).mean()
