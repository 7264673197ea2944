"""A Cascade-CLIP-style classifier (ICML 2024), adapted from segmentation to image classification.

Per stage: the patch tokens of its layers, each mapped to the joint space by its own new
LayerNorm + projection and L2-normalised, are summed with learnable, unnormalised,
Gaussian-initialised layer weights; class queries (text embeddings conditioned on the image's
global embedding) cross-attend to them in a small decoder; the class score is the mean over
patches of the last layer's attention logits (Cascade-CLIP's attention-to-mask, pooled). The
stage scores are summed. Unlike the reference, the new projections start as copies of the
tower's ``ln_post``/``proj`` and are trained (it left them frozen at random initialisation).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from .backbone import Backbone
from .base import ModelOutput, StagedClassifier
from .layers import VisualPrompts, stage_projection
from .vit import check_vit, embed_patches, project, run_blocks

__all__ = ["CascadeCLIPClassifier", "gaussian_layer_weights"]


def gaussian_layer_weights(num_layers: int) -> torch.Tensor:
    """exp(−d²/2) for each layer's distance d from the stage's last layer, e.g. [0.1353, 0.6065, 1.0]."""
    return torch.exp(-torch.arange(num_layers - 1, -1, -1, dtype=torch.float32).square() / 2)


class AttentionLogits(nn.Module):
    """Multi-head query/key projections; returns the pre-softmax logits q·kᵀ/√d_head, [B, H, C, N]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.decoder_heads = {heads} must divide the embedding size {dim}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] → [B, H, T, D/H]."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q, k = self.split(self.q(queries)), self.split(self.k(tokens))
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


class CrossAttentionLayer(nn.Module):
    """Cascade-CLIP's decoder layer: cross-attention only (no self-attention), post-norm, FFN 4·D."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.logits = AttentionLogits(dim, heads)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        attn = self.logits(queries, tokens).softmax(-1)
        mixed = (attn @ self.logits.split(self.v(tokens))).transpose(1, 2).flatten(2)
        queries = self.norm1(queries + self.out(mixed))
        return self.norm2(queries + self.ffn(queries))


class StageDecoder(nn.Module):
    """``num_layers`` cross-attention layers; the score is the last one's head-averaged attention
    logits, averaged over patches. Only that layer's q/k projections affect the score, so the last
    layer keeps just those (the reference's unused value/FFN weights are left out)."""

    def __init__(self, dim: int, heads: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.decoder_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, heads) for _ in range(num_layers - 1))
        self.score = AttentionLogits(dim, heads)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """queries [B, C, D], tokens [B, N, D] → class scores [B, C]."""
        for layer in self.layers:
            queries = layer(queries, tokens)
        return self.score(queries, tokens).mean(dim=(1, 3))


class CascadeCLIPClassifier(StagedClassifier):
    """Shallow visual prompts; per-stage NGA over projected patch tokens; per-stage class-query
    decoders; summed stage scores. It has no shared text classifier: the text enters through the
    class queries, so ``class_embeddings`` (the stage-1 text embeddings, [C, D]) are required."""

    shared_classifier = False
    needs_class_embeddings = True
    group_owners = {"prompts": "prompts", "projections": "projections", "nga": "layer_weights",
                    "queries": "decoders", "decoders": "decoders"}
    stage_owned = ("projections", "nga", "queries", "decoders")

    def __init__(self, backbone: Backbone, num_classes: int, class_embeddings: torch.Tensor,
                 stages: Sequence[Sequence[int]] = ((6, 7, 8), (9, 10, 11), (12,)), decoder_layers: int = 3,
                 decoder_heads: int = 8, prompt_tokens: int = 50, prompt_dropout: float = 0.0) -> None:
        super().__init__()
        self.visual = backbone.model.visual
        self.depth = check_vit(self.visual)
        self.stages = self.check_stages(stages, self.depth)
        self.extraction_layers = sorted({layer for stage in self.stages for layer in stage})
        dim = self.visual.output_dim
        if tuple(class_embeddings.shape) != (num_classes, dim):
            raise ValueError(f"class_embeddings must have shape ({num_classes}, {dim}), "
                             f"got {tuple(class_embeddings.shape)}")
        # Fixed text side, rebuilt from the text cache with the model: not a trained weight.
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.detach().float(), dim=-1),
                             persistent=False)

        width = self.visual.conv1.out_channels
        patch = self.visual.conv1.kernel_size[0]
        self.num_prompts = prompt_tokens
        self.prompts = VisualPrompts(prompt_tokens, width, patch, prompt_dropout) if prompt_tokens > 0 else None
        # The last block keeps the tower's own ln_post/proj (pre-trained for exactly that output);
        # every other layer of a stage gets its own new projection.
        self.projections = nn.ModuleList(
            nn.ModuleDict({str(layer): stage_projection(self.visual) for layer in stage if layer != self.depth})
            for stage in self.stages)
        self.nga = nn.ParameterList(nn.Parameter(gaussian_layer_weights(len(stage))) for stage in self.stages)
        self.queries = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in self.stages)
        self.decoders = nn.ModuleList(StageDecoder(dim, decoder_heads, decoder_layers) for _ in self.stages)

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "CascadeCLIPClassifier":
        if cfg.aggregation != "nga":
            raise ValueError(f"model.aggregation={cfg.aggregation} does not apply to this method: it learns its "
                             "own unnormalised layer weights")
        if class_embeddings is None:
            raise ValueError("this method needs class_embeddings (the [classes, embed_dim] stage-1 text "
                             "embeddings) for its class queries")
        return cls(backbone, num_classes, class_embeddings, stages=cfg.stages, decoder_layers=cfg.decoder_layers,
                   decoder_heads=cfg.decoder_heads, prompt_tokens=cfg.prompt_tokens,
                   prompt_dropout=cfg.prompt_dropout)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        groups = {"layernorms", "layer_weights", "decoders"}
        if cfg.prompt_tokens > 0:
            groups.add("prompts")
        if any(layer != depth for stage in cfg.stages for layer in stage):
            groups.add("projections")  # every layer but the tower's last gets its own projection
        return groups

    def _project(self, s: int, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens of one layer of stage s, [B, T, W] → joint space [B, T, D]."""
        return project(self.visual, tokens) if layer == self.depth else self.projections[s][str(layer)](tokens)

    def forward_features(self, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The outputs of the extraction layers (by 1-based layer) and of the last block, [B, T, W] each."""
        x = embed_patches(self.visual, images)
        if self.prompts is not None:
            x = self.prompts(x)
        hidden: dict[int, torch.Tensor] = {}
        for layer, x in run_blocks(self.visual, x, 1, self.depth):
            if layer in self.extraction_layers:
                hidden[layer] = x
        return hidden, x

    def forward_head(self, features: tuple[dict[int, torch.Tensor], torch.Tensor]) -> ModelOutput:
        """Everything after the blocks: ``forward_features`` output → summed and per-stage class scores."""
        hidden, final = features
        g = F.normalize(project(self.visual, final[:, :1]), dim=-1)  # global CLS, [B, 1, D]
        t = self.class_embeddings.to(g.dtype).expand(g.shape[0], -1, -1)  # [B, C, D]
        scores = []
        for s, stage in enumerate(self.stages):
            patches = [F.normalize(self._project(s, layer, hidden[layer][:, 1 + self.num_prompts:]), dim=-1)
                       for layer in stage]
            tokens = torch.einsum("n,nbtd->btd", self.nga[s].to(g.dtype), torch.stack(patches))
            scores.append(self.decoders[s](self.queries[s](torch.cat([t * g, t], dim=-1)), tokens))
        stage_logits = torch.stack(scores)
        return ModelOutput(stage_logits.sum(0), stage_logits)

    def nga_weights(self) -> list[list[float]]:
        return [w.tolist() for w in self.nga]

    def fusion_weights(self) -> Optional[list[float]]:
        """The stage scores are summed: nothing learned to plot."""
        return None
