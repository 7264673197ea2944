"""Shallow visual prompts (LaFTer/VPT): learned tokens inserted after the class token."""
from __future__ import annotations

import math

import torch
from torch import nn


class VisualPrompts(nn.Module):
    """``T`` prompt tokens of the tower's width, placed between CLS and the patch tokens.

    They are inserted after the positional embedding and ``ln_pre``, so they carry no position.
    Init U(−v, v) with v = sqrt(6 / (3·p² + W)) for the model's real patch size p (the reference
    code hard-coded p = 16 for every model).
    """

    def __init__(self, num_tokens: int, width: int, patch_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
        self.tokens = nn.Parameter(torch.empty(num_tokens, width).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, W] → [B, 1 + T + N, W]."""
        prompts = self.dropout(self.tokens.to(x.dtype)).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
