"""Stage adapters: residual MLPs that start as the identity."""
from __future__ import annotations

import torch
from torch import nn


class StageAdapter(nn.Module):
    """a(z) = z + W2·GELU(W1·z + b1) + b2 with W2, b2 = 0, so tuning starts from the plain model."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.fc2(self.act(self.fc1(z)))
