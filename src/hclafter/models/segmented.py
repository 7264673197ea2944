"""The seed's "segmented" multi-layer-prompt baseline (the reference's MultiLayerLaFTer), done right.

The tower's blocks are split into consecutive stages. Each stage inserts its own new prompt
tokens right after CLS before its first block (so the sequence grows stage by stage), collects
the CLS token after each of its blocks, aggregates them with NGA, maps the result into the joint
space with its own LayerNorm + projection, and classifies it with the shared text classifier;
the stage logits are fused with learned weights. Unlike the reference, the prompts, σ's,
projections and fusion weights train, and the multi-stage path is used in training and in
evaluation alike.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..core.config import ModelConfig
from .backbone import Backbone
from .base import ModelOutput, StagedClassifier
from .hybrid import aggregation_modules
from .layers import NGA, StageFusion, TextClassifier, VisualPrompts, stage_projection
from .vit import check_vit, embed_patches, run_blocks


class SegmentedLaFTer(StagedClassifier):
    """Stage-wise prompts inserted at stage starts; per-stage NGA, projection; shared classifier; fusion."""

    needs_consecutive_cover = True
    group_owners = {"prompts": "prompts", "nga": "nga", "projections": "projections", "classifier": "classifier",
                    "fusion": "fusion"}
    stage_owned = ("prompts", "nga", "projections")

    def __init__(self, backbone: Backbone, num_classes: int,
                 stages: Sequence[Sequence[int]] = ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11), (12,)),
                 stage_prompt_tokens: int = 16, nga_init_sigma: float = 1.0, prompt_dropout: float = 0.0,
                 normalize_features: bool = True, aggregation: str = "nga") -> None:
        super().__init__()
        self.visual = backbone.model.visual
        self.stages = self.check_stages(stages, check_vit(self.visual))
        self.extraction_layers = [layer for stage in self.stages for layer in stage]
        if stage_prompt_tokens < 0:
            raise ValueError(f"model.stage_prompt_tokens must be >= 0, got {stage_prompt_tokens}")

        width = self.visual.conv1.out_channels
        patch = self.visual.conv1.kernel_size[0]
        self.prompts = (nn.ModuleList(VisualPrompts(stage_prompt_tokens, width, patch, prompt_dropout)
                                      for _ in self.stages) if stage_prompt_tokens > 0 else None)
        self.nga = aggregation_modules(self.stages, aggregation, nga_init_sigma)
        self.projections = nn.ModuleList(stage_projection(self.visual) for _ in self.stages)
        self.classifier = TextClassifier(self.visual.output_dim, num_classes, normalize_features)
        self.fusion = StageFusion(len(self.stages))

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "SegmentedLaFTer":
        return cls(backbone, num_classes, stages=cfg.stages, stage_prompt_tokens=cfg.stage_prompt_tokens,
                   nga_init_sigma=cfg.nga_init_sigma, prompt_dropout=cfg.prompt_dropout,
                   normalize_features=cfg.normalize_features, aggregation=cfg.aggregation)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        groups = {"layernorms", "classifier", "projections"}
        if cfg.stage_prompt_tokens > 0:
            groups.add("prompts")
        if len(cfg.stages) > 1:
            groups.add("fusion")
        if cfg.aggregation == "nga" and any(len(stage) > 1 for stage in cfg.stages):
            groups.add("nga")
        return groups

    def inert_parameters(self) -> set[str]:
        """As the hybrid's, and the tower's own ln_post, which the stages' projection copies replace."""
        inert = {"fusion.beta"} if len(self.stages) == 1 else set()
        inert |= {f"visual.ln_post.{n}" for n, _ in self.visual.ln_post.named_parameters()}
        return inert | {f"nga.{s}.sigma" for s, stage in enumerate(self.stages)
                        if len(stage) == 1 and isinstance(self.nga[s], NGA)}

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per stage, the NGA-aggregated CLS tokens of its blocks mapped to the joint space: S × [B, D]."""
        x = embed_patches(self.visual, images)  # [B, 1 + N, W]
        features = []
        for s, stage in enumerate(self.stages):
            if self.prompts is not None:
                x = self.prompts[s](x)  # right after CLS, ahead of earlier stages' prompts
            cls_tokens = []
            for _, x in run_blocks(self.visual, x, stage[0], stage[-1]):
                cls_tokens.append(x[:, 0])
            features.append(self.projections[s](self.nga[s](torch.stack(cls_tokens))))
        return features

    def forward_head(self, features: list[torch.Tensor]) -> ModelOutput:
        stage_logits = torch.stack([self.classifier(z) for z in features])
        return ModelOutput(self.fusion(stage_logits), stage_logits)
