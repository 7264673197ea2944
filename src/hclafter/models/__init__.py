"""The methods' models and their registry: the only place that maps a method name to a class.

Every model implements :class:`~hclafter.models.base.StagedClassifier`; what a method can do
(feature cache, shared text classifier, stage rules, parameter groups) is declared on its class.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .base import ModelOutput, StagedClassifier
from .cascadeclip import CascadeCLIPClassifier
from .hybrid import HybridCascadeLaFTer
from .layers import NGA
from .segmented import SegmentedLaFTer

if TYPE_CHECKING:
    from .backbone import Backbone
    from ..core.config import ModelConfig

__all__ = ["METHODS", "NGA", "CascadeCLIPClassifier", "HybridCascadeLaFTer", "ModelOutput", "SegmentedLaFTer",
           "StagedClassifier", "build_model", "method_class"]

METHODS: dict[str, type[StagedClassifier]] = {
    "hybrid": HybridCascadeLaFTer,
    "segmented": SegmentedLaFTer,
    "cascadeclip": CascadeCLIPClassifier,
}


def method_class(name: str) -> type[StagedClassifier]:
    """The model class of ``model.method``; a ValueError listing the registered names otherwise."""
    if name not in METHODS:
        raise ValueError(f"model.method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def build_model(backbone: "Backbone", num_classes: int, cfg: "ModelConfig",
                class_embeddings: Optional[torch.Tensor] = None) -> StagedClassifier:
    """The model ``cfg.method`` names; ``class_embeddings`` ([C, D] stage-1 text embeddings) are
    needed by methods that declare ``needs_class_embeddings``."""
    return method_class(cfg.method).from_config(backbone, num_classes, cfg, class_embeddings)
