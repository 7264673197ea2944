"""HybridCascade-LaFTer: the whole forward pass.

images → patch embedding (+ visual prompts) → CLS after each extraction layer, through the
tower's own ln_post/proj → per-stage NGA → stage adapters → shared text-trained classifier →
learned fusion of the stage logits.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..core.config import ModelConfig
from .backbone import Backbone
from .base import ModelOutput, StagedClassifier
from .layers import (NGA, AdaptiveFusion, MeanAggregation, StageAdapter, StageFusion, StageMixer, TextClassifier,
                     VisualPrompts, adapt_stages)
from .vit import check_vit, cls_after_blocks, embed_patches, project


def aggregation_modules(stages: Sequence[Sequence[int]], aggregation: str, init_sigma: float) -> nn.ModuleList:
    """Per stage, NGA over its layers, or the uniform mean of the "w/o NGA" ablation."""
    if aggregation not in ("nga", "mean"):
        raise ValueError(f"model.aggregation: {aggregation!r} is not one of nga, mean")
    return nn.ModuleList(NGA(len(stage), init_sigma) if aggregation == "nga" else MeanAggregation(len(stage))
                         for stage in stages)


class HybridCascadeLaFTer(StagedClassifier):
    """Multi-stage CLS features of a prompted CLIP ViT, classified by one shared text classifier.

    With ``stages=[[L]]`` and no adapters it is plain LaFTer (final layer only).
    """

    supports_feature_cache = True
    allows_shared_layers = True
    group_owners = {"prompts": "prompts", "classifier": "classifier", "adapters": "stage_adapters",
                    "fusion": "fusion", "nga": "nga", "mixer": "mixer"}
    stage_owned = ("nga", "adapters")

    def __init__(self, backbone: Backbone, num_classes: int, prompt_tokens: int = 50,
                 stages: Sequence[Sequence[int]] = ((5, 6, 7), (8, 9), (10, 11, 12)),
                 stage_adapters: bool = True, nga_init_sigma: float = 1.0, prompt_dropout: float = 0.0,
                 normalize_features: bool = True, aggregation: str = "nga", shared_adapter: bool = False,
                 fusion: str = "static", stage_mixer: str = "none", mixer_heads: int = 4) -> None:
        super().__init__()
        self.visual = backbone.model.visual
        self.stages = self.check_stages(stages, check_vit(self.visual))
        self.extraction_layers = sorted({layer for stage in self.stages for layer in stage})
        # Positions of each stage's layers in the stacked layer-feature tensor.
        self._stage_index = [[self.extraction_layers.index(layer) for layer in stage] for stage in self.stages]

        width = self.visual.conv1.out_channels
        dim = self.visual.output_dim
        patch = self.visual.conv1.kernel_size[0]
        self.prompts = VisualPrompts(prompt_tokens, width, patch, prompt_dropout) if prompt_tokens > 0 else None
        self.nga = aggregation_modules(self.stages, aggregation, nga_init_sigma)
        # One adapter per stage, or one shared by all (the ablation that separates adapter capacity from
        # per-stage specialisation).
        count = 1 if shared_adapter else len(self.stages)
        self.adapters = nn.ModuleList(StageAdapter(dim) for _ in range(count)) if stage_adapters else None
        if shared_adapter:
            self.stage_owned = ("nga",)
        self.classifier = TextClassifier(dim, num_classes, normalize_features)
        if fusion not in ("static", "adaptive") or stage_mixer not in ("none", "attention"):
            raise ValueError(f"model.fusion={fusion!r} / model.stage_mixer={stage_mixer!r}: expected static|adaptive "
                             "and none|attention")
        self.fusion = StageFusion(len(self.stages)) if fusion == "static" else AdaptiveFusion(len(self.stages), dim)
        self.mixer = StageMixer(dim, mixer_heads) if stage_mixer == "attention" else None

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "HybridCascadeLaFTer":
        return cls(backbone, num_classes, prompt_tokens=cfg.prompt_tokens, stages=cfg.stages,
                   stage_adapters=cfg.stage_adapters, nga_init_sigma=cfg.nga_init_sigma,
                   prompt_dropout=cfg.prompt_dropout, normalize_features=cfg.normalize_features,
                   aggregation=cfg.aggregation, shared_adapter=cfg.shared_adapter, fusion=cfg.fusion,
                   stage_mixer=cfg.stage_mixer, mixer_heads=cfg.mixer_heads)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        groups = {"layernorms", "classifier"}
        if cfg.prompt_tokens > 0:
            groups.add("prompts")
        if cfg.stage_adapters:
            groups.add("stage_adapters")
        if len(cfg.stages) > 1:
            groups.add("fusion")
        if cfg.aggregation == "nga" and any(len(stage) > 1 for stage in cfg.stages):
            groups.add("nga")
        if cfg.stage_mixer == "attention":
            groups.add("mixer")
        return groups

    def inert_parameters(self) -> set[str]:
        """β (and the gate) of a single stage (its softmax is 1) and σ of a one-layer stage (its weight is 1)."""
        inert = {n for n, _ in self.named_parameters() if n.startswith("fusion.")} if len(self.stages) == 1 else set()
        return inert | {f"nga.{s}.sigma" for s, stage in enumerate(self.stages)
                        if len(stage) == 1 and isinstance(self.nga[s], NGA)}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → the first block's input tokens, visual prompts included: [B, N, W]."""
        tokens = embed_patches(self.visual, images)
        return self.prompts(tokens) if self.prompts is not None else tokens

    def layer_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → [len(extraction_layers), B, D]."""
        return project(self.visual, cls_after_blocks(self.visual, self.embed(images), self.extraction_layers))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer_features(images)

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        """Everything after the encoder: [n, B, D] layer features → fused and per-stage logits."""
        z = torch.stack([self.nga[s](features[index]) for s, index in enumerate(self._stage_index)])
        if self.mixer is not None:
            z = self.mixer(z)
        if self.adapters is not None:  # batched where kernel launches cost more than stacking the weights
            if z.is_cuda and len(self.adapters) == len(z):
                z = adapt_stages(self.adapters, z)
            else:
                z = torch.stack([self.adapters[s % len(self.adapters)](x) for s, x in enumerate(z)])
        # Stage by stage, so the classifier's gradient sums the stages in the same order as ever.
        stacked = torch.stack([self.classifier(stage) for stage in z])
        if isinstance(self.fusion, AdaptiveFusion):
            fused, weights = self.fusion(stacked, z)
            return ModelOutput(fused, stacked, weights)
        return ModelOutput(self.fusion(stacked), stacked)
