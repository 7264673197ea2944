"""Learned fusion of per-stage logits."""
from __future__ import annotations

import torch
from torch import nn


class StageFusion(nn.Module):
    """logits = Σ_s softmax(β)_s · logits_s, β initialised to 0 (equal weights)."""

    def __init__(self, num_stages: int) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(num_stages))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.beta, dim=0)

    def forward(self, stage_logits: torch.Tensor) -> torch.Tensor:
        """[S, B, C] → [B, C]."""
        return torch.einsum("s,sbc->bc", self.weights().to(stage_logits.dtype), stage_logits)
