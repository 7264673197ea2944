"""The method's small trainable layers, each in the order the forward pass meets it: visual
prompts, per-stage aggregation (NGA or a plain mean), stage adapters, the shared text-trained
classifier and the fusion of stage logits; plus the projection copy the baselines use."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
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


def adapt_stages(adapters: nn.ModuleList, z: torch.Tensor) -> torch.Tensor:
    """Each stage's adapter on its own features, [S, B, D] → [S, B, D], as two batched products
    over the stacked weights instead of 2·S small ones: fewer kernels on a GPU; on CPU the same
    values and gradients bit for bit, but stacking the weights costs more than the calls it saves
    (a ViT-B-32 head step: 7.3 against 5.9 ms)."""
    def stacked(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layers = [getattr(a, name) for a in adapters]
        return torch.stack([f.weight for f in layers]).transpose(1, 2), torch.stack([f.bias for f in layers])[:, None]

    (w1, b1), (w2, b2) = stacked("fc1"), stacked("fc2")
    return z + torch.baddbmm(b2, adapters[0].act(torch.baddbmm(b1, z, w1)), w2)


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


class AdaptiveFusion(nn.Module):
    """Per-image stage weights softmax(β + G·[ẑ_1; …; ẑ_S]) over the L2-normalised stage features ẑ_s.
    G is zero-initialised, so the fusion starts exactly as :class:`StageFusion` (equal weights)."""

    def __init__(self, num_stages: int, dim: int) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(num_stages))
        self.gate = nn.Linear(num_stages * dim, num_stages)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def weights(self) -> torch.Tensor:
        """The input-independent part, softmax(β) (what the per-epoch record shows)."""
        return torch.softmax(self.beta, dim=0)

    def image_weights(self, features: torch.Tensor) -> torch.Tensor:
        """[S, B, D] stage features → [B, S] weights."""
        flat = F.normalize(features, dim=-1).transpose(0, 1).flatten(1)
        return torch.softmax(self.beta + self.gate(flat.to(self.gate.weight.dtype)), dim=-1)

    def forward(self, stage_logits: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, B, C] logits and [S, B, D] features → fused [B, C] logits and the [B, S] weights."""
        weights = self.image_weights(features)
        return torch.einsum("bs,sbc->bc", weights.to(stage_logits.dtype), stage_logits), weights


class StageMixer(nn.Module):
    """The stage features attend to each other: z + MHA(z, z, z) over the S stages of each image, with
    the attention's output projection zero-initialised, so the mixer starts as the identity."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.mixer_heads = {heads} must divide the embedding size {dim}")
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[S, B, D] → [S, B, D]."""
        x = features.transpose(0, 1)
        return (x + self.attention(x, x, x, need_weights=False)[0]).transpose(0, 1)


def stage_projection(visual: nn.Module) -> nn.Sequential:
    """A new trainable LayerNorm(W) + Linear(W→D, no bias), initialised as copies of the tower's
    ``ln_post`` and ``proj``: it starts exactly as the pre-trained map into the text space
    (the reference drew these at random, so they started unaligned with the text classifier)."""
    width = visual.conv1.out_channels
    proj: Optional[torch.Tensor] = visual.proj
    weight = proj.detach().T if proj is not None else torch.eye(width)
    linear = nn.Linear(width, weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return nn.Sequential(copy.deepcopy(visual.ln_post).requires_grad_(True), linear)
