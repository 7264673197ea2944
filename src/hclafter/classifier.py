"""The shared text-trained classifier g(x) = U · x/‖x‖."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextClassifier(nn.Module):
    """Bias-free linear classifier over L2-normalised joint-space features.

    It is trained on normalised text embeddings (stage 1), so image features are normalised the
    same way; ``normalize=False`` reproduces the reference code, which fed raw image features.
    """

    def __init__(self, dim: int, num_classes: int, normalize: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes, bias=False)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(x, dim=-1) if self.normalize else x)
