"""The methods' models and their registry: the only place that maps a method name to a class.

Every model implements :class:`~hclafter.models.base.StagedClassifier`; what a method can do
(feature cache, shared text classifier, stage rules, parameter groups, a fit without gradient
steps) is declared on its class.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..core.config import Config, ConfigError, ModelConfig, tuned_groups
from .adapters import CLIPAdapter, TipAdapter, TipAdapterF
from .backbone import Backbone, tower_depth
from .base import LabelledFeatures, ModelOutput, StagedClassifier
from .cascadeclip import CascadeCLIPClassifier
from .coop import CoOp
from .hybrid import HybridCascadeLaFTer
from .layers import NGA
from .probes import LinearProbe, TextAnchoredProbe
from .segmented import SegmentedLaFTer

__all__ = ["METHODS", "NGA", "CLIPAdapter", "CascadeCLIPClassifier", "CoOp", "HybridCascadeLaFTer", "LabelledFeatures",
           "LinearProbe", "ModelOutput", "SegmentedLaFTer", "StagedClassifier", "TextAnchoredProbe", "TipAdapter",
           "TipAdapterF", "build_model", "cache_applies", "check_config", "method_class", "phase_reads_features",
           "run_groups"]

METHODS: dict[str, type[StagedClassifier]] = {
    "hybrid": HybridCascadeLaFTer,
    "segmented": SegmentedLaFTer,
    "cascadeclip": CascadeCLIPClassifier,
    # The field's simple baselines, on the frozen tower's final feature (SPEC §11).
    "linear_probe": LinearProbe,
    "clap_probe": TextAnchoredProbe,
    "tip_adapter": TipAdapter,
    "tip_adapter_f": TipAdapterF,
    "clip_adapter": CLIPAdapter,
    "coop": CoOp,
}


def method_class(name: str) -> type[StagedClassifier]:
    """The model class of ``model.method``; a ValueError listing the registered names otherwise."""
    if name not in METHODS:
        raise ValueError(f"model.method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def check_config(cfg: Config) -> None:
    """The checks of a run's settings that depend on its method, made before any data is read or
    model built: a registered method, stages that fit the backbone's real depth, the feature cache
    for a method that fits on it, and, for a method trained by gradient steps, phases that each train
    something of it (a ConfigError naming the key)."""
    if cfg.model.method not in METHODS:
        raise ConfigError(f"model.method: {cfg.model.method!r} is not one of {', '.join(METHODS)}")
    method, depth = METHODS[cfg.model.method], tower_depth(cfg.backbone)
    try:
        method.check_stages(cfg.model.stages, depth)
    except ValueError as e:
        raise ConfigError(f"{e} ({cfg.backbone.name}, model.method={cfg.model.method})") from None
    if cfg.mode == "train" and method.uses_split_features and not cache_applies(cfg):
        raise ConfigError(f"model.method={cfg.model.method} fits on the frozen tower's cached features: it needs "
                          "train.feature_cache=true, train.supervision=labels, data.train_augment=none and no phase "
                          "training layernorms or backbone")
    if cfg.mode != "train" or not method.trained_by_gradient:
        return
    trainable = method.trainable_groups(cfg.model, depth)
    for i, phase in enumerate(cfg.train.phases):
        if not set(phase.train) & trainable:
            raise ConfigError(f"train.phases[{i}].train = {phase.train}: no parameter of these groups receives a "
                              f"gradient with model.method={cfg.model.method} and these model settings, so the "
                              f"phase would change nothing; train one of {sorted(trainable)}")


def cache_applies(cfg: Config) -> bool:
    """Whether the image tower's output is fixed for the whole run, so that every image is encoded once
    into the feature cache (``engine/inputs.py``)."""
    return (_deterministic_inputs(cfg)
            and method_class(cfg.model.method).fixed_features(cfg.model, run_groups(cfg)))


def phase_reads_features(cfg: Config, groups: set[str]) -> bool:
    """Whether a phase that trains ``groups`` sees each image's ``forward_features`` unchanged from its
    first step to its last (the visual prompts at the values the phase starts with): then the phase
    encodes every image once (``engine/loop.py``) instead of at every step and validation."""
    method = method_class(cfg.model.method)
    return _deterministic_inputs(cfg) and method.supports_feature_cache and not groups & method.feature_groups


def _deterministic_inputs(cfg: Config) -> bool:
    """Training images reach the tower the same way at every pass (no random view), and features may be reused."""
    return cfg.train.feature_cache and cfg.train.supervision == "labels" and cfg.data.train_augment == "none"


def run_groups(cfg: Config) -> set[str]:
    """The groups a run of ``cfg`` sets: those its phases train, or for a method fitted without
    gradient steps the groups its fit sets (its phases do not apply)."""
    method = method_class(cfg.model.method)
    return tuned_groups(cfg.train) if method.trained_by_gradient else set(method.fitted_groups)


def build_model(backbone: Backbone, num_classes: int, cfg: ModelConfig, class_embeddings: Optional[torch.Tensor] = None,
                class_names: Optional[Sequence[str]] = None) -> StagedClassifier:
    """The model ``cfg.method`` names; ``class_embeddings`` ([C, D] stage-1 text embeddings) are
    needed by methods that declare ``needs_class_embeddings``, the class names by those that write a
    text prompt per class (CoOp)."""
    return method_class(cfg.method).from_config(backbone, num_classes, cfg, class_embeddings, class_names)
