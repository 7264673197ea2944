"""Neighborhood Gaussian Aggregation (Cascade-CLIP) of the layer features within a stage."""
from __future__ import annotations

import torch
from torch import nn


class NGA(nn.Module):
    """w_k = exp(−(n−k)² / 2σ²), normalised over the stage's n layers (k = 0..n−1, depth order).

    The deepest layer is at distance 1 and gets the largest weight; σ is learnable.
    """

    def __init__(self, num_layers: int, init_sigma: float = 1.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"NGA needs at least one layer, got {num_layers}")
        if init_sigma <= 0:
            raise ValueError(f"NGA init_sigma must be > 0, got {init_sigma}")
        self.sigma = nn.Parameter(torch.tensor(float(init_sigma)))
        self.register_buffer("distance", torch.arange(num_layers, 0, -1, dtype=torch.float32), persistent=False)

    def weights(self) -> torch.Tensor:
        # softmax of the log-weights equals the normalised Gaussian and cannot underflow to 0/0.
        return torch.softmax(-self.distance.square() / (2 * self.sigma.square()), dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[n, B, D] → [B, D]."""
        return torch.einsum("n,nbd->bd", self.weights().to(features.dtype), features)


class MeanAggregation(nn.Module):
    """Uniform weights, no parameters: the "w/o NGA" ablation."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers

    def weights(self) -> torch.Tensor:
        return torch.full((self.num_layers,), 1.0 / self.num_layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=0)
