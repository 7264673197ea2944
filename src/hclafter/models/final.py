"""What the field's simple baselines share: they read the frozen tower's final CLS feature only,
mapped into the joint space by its own ``ln_post``/``proj`` (open_clip's ``encode_image``), as
one stage with one layer. That feature is a fixed function of the image, so it is cached."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backbone import Backbone
from .base import ModelOutput, StagedClassifier
from .vit import check_vit, cls_after_blocks, embed_patches, project


class FinalFeatureClassifier(StagedClassifier):
    """Base of the baselines on the final feature: ``forward_features`` gives [1, B, D], the head
    (``classify``, in each subclass) maps a batch [B, D] to class scores."""

    supports_feature_cache = True
    feature_groups = frozenset({"layernorms", "backbone"})  # no visual prompts here (CoOp's are in the text)

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.visual = backbone.model.visual
        self.depth = check_vit(self.visual)
        self.stages = [[self.depth]]
        self.extraction_layers = [self.depth]

    @classmethod
    def check_stages(cls, stages: Sequence[Sequence[int]], depth: int) -> list[list[int]]:
        """The final block alone: ``model.stages`` does not apply to these methods."""
        return [[depth]]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return project(self.visual, cls_after_blocks(self.visual, embed_patches(self.visual, images), [self.depth]))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] final features → [B, C] class scores."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        logits = self.classify(features[0])
        return ModelOutput(logits, logits[None])

    def nga_weights(self) -> list[list[float]]:
        return [[1.0]]

    def fusion_weights(self) -> Optional[list[float]]:
        """One stage: nothing fused."""
        return None
