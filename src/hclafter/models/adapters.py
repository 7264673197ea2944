"""The adapters of the field on the frozen tower's final feature: Tip-Adapter (a cache of the
training features, training-free), Tip-Adapter-F (its keys trained) and CLIP-Adapter (a residual
bottleneck MLP). Their text side is the stage-1 classifier U, which every method here starts from
(the papers' is CLIP's template ensemble). How much of the adapter enters a prediction (α and β,
the residual ratio) is chosen on the validation split, never on test."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from .backbone import Backbone
from .base import LabelledFeatures
from .final import FinalFeatureClassifier
from .layers import TextClassifier
from .selection import best_on_validation, validation_score

# Tip-Adapter's search, both on log scales: β from the reference's lowest 0.1 up to 100, sharper than its highest
# 7, which was set for CLIP RN50's features (on the demo world the cache alone scores 56 % on validation at β = 7,
# 77 % at β = 60); α from 1e-4 to 1e4, since the cache term grows with the training images per class and shrinks
# with β, and U's scores are not CLIP's (scale 100).
BETAS = tuple(10 ** (k / 4) for k in range(-4, 9))
ALPHAS = tuple(10 ** (k / 4) for k in range(-16, 17))
# CLIP-Adapter's residual ratio, from the text classifier alone (0) to the adapter alone (1).
RATIOS = tuple(k / 20 for k in range(21))
REDUCTION = 4  # CLIP-Adapter's bottleneck: D → D/4 → D


def cache_scores(f: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 beta: torch.Tensor | float) -> torch.Tensor:
    """Tip-Adapter's cache term exp(−β(1 − f·Kᵀ))·V for normalised features f [B, D], keys K [N, D] and
    one-hot values V [N, C]: [B, C]."""
    return torch.exp(-beta * (1 - f @ keys.T)) @ values


def tip_logits(features: torch.Tensor, text_weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: torch.Tensor | float, beta: torch.Tensor | float) -> torch.Tensor:
    """Tip-Adapter's logits: f·Uᵀ + α·exp(−β(1 − f·Kᵀ))·V for the L2-normalised features f [B, D] and the
    text classifier U [C, D]."""
    f = F.normalize(features, dim=-1)
    return f @ text_weight.T + alpha * cache_scores(f, keys, values, beta)


def residual_mix(adapted: torch.Tensor, features: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """CLIP-Adapter's r·A(f) + (1 − r)·f."""
    return ratio * adapted + (1 - ratio) * features


class TipAdapter(FinalFeatureClassifier):
    """Tip-Adapter (Zhang et al., ECCV 2022), training-free: the cache's keys are the L2-normalised
    training features and its values their one-hot labels (:func:`tip_logits`); α and β are chosen on
    the validation split over ``ALPHAS`` × ``BETAS``."""

    shared_classifier = False
    needs_class_embeddings = True
    trained_by_gradient = False
    uses_split_features = True
    fitted_groups = frozenset({"classifier"})
    group_owners = {"cache_keys": "classifier"}
    data_sized = ("cache_keys", "cache_values")

    def __init__(self, backbone: Backbone, num_classes: int, text_weight: torch.Tensor) -> None:
        super().__init__(backbone)
        dim = self.visual.output_dim
        if tuple(text_weight.shape) != (num_classes, dim):
            raise ValueError(f"class_embeddings (the stage-1 text classifier) must have shape ({num_classes}, {dim}), "
                             f"got {tuple(text_weight.shape)}")
        # Fixed text side, rebuilt from the run's stage-1 classifier with the model: not a trained weight.
        self.register_buffer("text_weight", text_weight.detach().float().clone(), persistent=False)
        self.cache_keys = nn.Parameter(torch.zeros(0, dim))
        self.register_buffer("cache_values", torch.zeros(0, num_classes))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("beta", torch.tensor(1.0))

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "TipAdapter":
        if class_embeddings is None:
            raise ValueError(f"model.method={cfg.method} needs class_embeddings (the [classes, embed_dim] stage-1 "
                             "text classifier) for its text term")
        return cls(backbone, num_classes, class_embeddings)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        return set()

    def mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, β) of the predictions."""
        return self.alpha, self.beta

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.mixing()
        return tip_logits(features, self.text_weight, self.cache_keys, self.cache_values, alpha, beta)

    def fit(self, train: LabelledFeatures, val: LabelledFeatures) -> dict:
        """The cache from the training split, then α and β on validation."""
        device = self.text_weight.device
        with torch.no_grad():
            self.cache_keys.data = F.normalize(train.features[0].float(), dim=-1).to(device)
            self.cache_values = F.one_hot(train.labels.long(), len(self.text_weight)).float().to(device)
        return self.select(val)

    @torch.no_grad()
    def select(self, val: LabelledFeatures) -> dict:
        f = F.normalize(val.features[0].float().to(self.text_weight.device), dim=-1)
        text = f @ self.text_weight.T
        cache = {beta: cache_scores(f, self.cache_keys, self.cache_values, beta) for beta in BETAS}
        alpha, beta = best_on_validation(((a, b) for b in BETAS for a in ALPHAS),
                                         lambda ab: validation_score(text + ab[0] * cache[ab[1]], val.labels))
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        return {"alpha": alpha, "beta": beta}


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: Tip-Adapter whose cache keys are then trained (group ``classifier``), with the α and
    β the training-free fit chose; after each epoch α and β are chosen again on the validation split
    for its predictions, and the epoch by its validation accuracy with them (the reference code picks
    the epoch on test). The keys train on the cached features of the training images themselves, which
    match their own keys exactly (the reference trains on augmented views)."""

    trained_by_gradient = True
    fitted_groups = frozenset()

    def __init__(self, backbone: Backbone, num_classes: int, text_weight: torch.Tensor) -> None:
        super().__init__(backbone, num_classes, text_weight)
        self.register_buffer("train_alpha", torch.tensor(1.0))
        self.register_buffer("train_beta", torch.tensor(1.0))

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        return {"classifier"}

    def mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training's (α, β) in training mode, the ones chosen on validation otherwise."""
        return (self.train_alpha, self.train_beta) if self.training else (self.alpha, self.beta)

    def fit(self, train: LabelledFeatures, val: LabelledFeatures) -> dict:
        chosen = super().fit(train, val)
        self.train_alpha.copy_(self.alpha)
        self.train_beta.copy_(self.beta)
        return {f"train_{name}": value for name, value in chosen.items()}


class CLIPAdapter(FinalFeatureClassifier):
    """CLIP-Adapter (Gao et al., IJCV 2023): a bottleneck MLP A (D → D/4 → D, ReLU after each layer, no
    biases) on the final feature f, mixed in with residual ratio r: ``adapt(f, r) = r·A(f) + (1 − r)·f``,
    then the stage-1 text classifier. It trains with ``model.adapter_ratio`` (the paper's 0.2); after
    each epoch the ratio its predictions use is chosen on the validation split from ``RATIOS``."""

    uses_split_features = True
    group_owners = {"adapter": "stage_adapters", "classifier": "classifier"}

    def __init__(self, backbone: Backbone, num_classes: int, ratio: float = 0.2,
                 normalize_features: bool = True) -> None:
        super().__init__(backbone)
        dim = self.visual.output_dim
        self.adapter = nn.Sequential(nn.Linear(dim, dim // REDUCTION, bias=False), nn.ReLU(),
                                     nn.Linear(dim // REDUCTION, dim, bias=False), nn.ReLU())
        self.classifier = TextClassifier(dim, num_classes, normalize_features)
        self.train_ratio = ratio
        self.register_buffer("ratio", torch.tensor(float(ratio)))

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "CLIPAdapter":
        return cls(backbone, num_classes, cfg.adapter_ratio, cfg.normalize_features)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        return {"stage_adapters", "classifier"}

    def adapt(self, features: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
        return residual_mix(self.adapter(features), features, ratio)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.adapt(features, self.train_ratio if self.training else self.ratio))

    @torch.no_grad()
    def select(self, val: LabelledFeatures) -> dict:
        f = val.features[0].float().to(self.ratio.device)
        adapted = self.adapter(f)
        ratio = best_on_validation(RATIOS, lambda r: validation_score(
            self.classifier(residual_mix(adapted, f, r)), val.labels))
        self.ratio.fill_(ratio)
        return {"ratio": ratio}
