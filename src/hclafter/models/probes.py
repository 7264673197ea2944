"""Linear probes on the frozen tower's L2-normalised final feature, fitted without gradient steps:
CLIP's and CoOp's logistic-regression probe, and a probe held near the stage-1 text classifier
(CLAP's idea). Each chooses its regularisation on the validation split by the CoOp search."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn

from ..core.config import ModelConfig
from .backbone import Backbone
from .base import LabelledFeatures
from .final import FinalFeatureClassifier
from .layers import TextClassifier
from .selection import log_search, validation_score

# scikit-learn's L-BFGS iterations per fit, as CLIP's and CoOp's probes; the anchored probe's L-BFGS alike.
MAX_ITER = 1000


def final_features(split: LabelledFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2-normalised final features [N, D] (float32, on the CPU) and the labels [N] of a split."""
    return F.normalize(split.features[0].float().cpu(), dim=-1), split.labels.cpu()


def logistic_regression(x: torch.Tensor, y: torch.Tensor, c: float, num_classes: int,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (scikit-learn, L-BFGS, L2 penalty with inverse strength ``c``) as
    softmax weights [C, D] and biases [C]. With two classes scikit-learn fits the binary model; its
    weights ±w/2 give the same probabilities."""
    missing = sorted(set(range(num_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"model.method=linear_probe: the training split has no image of class index {missing}; "
                         "a probe cannot score a class it never saw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the weakest penalties of the grid may not converge
        fitted = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER).fit(x.double().numpy(), y.numpy())
    coef, intercept = fitted.coef_, fitted.intercept_
    if len(coef) == 1:
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    return torch.from_numpy(coef).float(), torch.from_numpy(intercept).float()


class LinearProbe(FinalFeatureClassifier):
    """Multinomial logistic regression on the L2-normalised final feature, the linear probe of CLIP and
    of CoOp's ``lpclip``: scikit-learn's L-BFGS, its inverse regularisation C chosen on the validation
    split by :func:`~hclafter.models.selection.log_search` (grid 1e6 … 1e-6, then bisection rounds)."""

    shared_classifier = False
    trained_by_gradient = False
    uses_split_features = True
    fitted_groups = frozenset({"classifier"})
    group_owners = {"linear": "classifier"}

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__(backbone)
        self.linear = nn.Linear(self.visual.output_dim, num_classes)

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "LinearProbe":
        return cls(backbone, num_classes)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        return set()

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1))

    def fit(self, train: LabelledFeatures, val: LabelledFeatures) -> dict:
        (x, y), (xv, yv) = final_features(train), final_features(val)
        fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

        def score(c: float) -> tuple[float, float]:
            fits[c] = logistic_regression(x, y, c, self.linear.out_features)
            weight, bias = fits[c]
            return validation_score(xv @ weight.T + bias, yv)

        c = log_search(score)
        with torch.no_grad():
            self.linear.weight.copy_(fits[c][0])
            self.linear.bias.copy_(fits[c][1])
        return {"C": c}


def anchored_fit(x: torch.Tensor, y: torch.Tensor, anchor: torch.Tensor, penalty: float) -> torch.Tensor:
    """argmin_W CE(x·Wᵀ, y) + penalty·‖W − anchor‖² (bias-free), by full-batch L-BFGS from ``anchor``."""
    weight = anchor.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T, y) + penalty * (weight - anchor).square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach()


class TextAnchoredProbe(FinalFeatureClassifier):
    """A linear probe that starts at the stage-1 text classifier U and pays λ·‖W − U‖² for leaving it
    (CLAP, Silva-Rodríguez et al., CVPR 2024, keeps a probe near the zero-shot prototypes this way,
    with class-wise multipliers fitted on the training set; here one λ, chosen on the validation split
    by :func:`~hclafter.models.selection.log_search`). Bias-free on L2-normalised features, as U."""

    trained_by_gradient = False
    uses_split_features = True
    fitted_groups = frozenset({"classifier"})
    group_owners = {"classifier": "classifier"}

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__(backbone)
        self.classifier = TextClassifier(self.visual.output_dim, num_classes)

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "TextAnchoredProbe":
        return cls(backbone, num_classes)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        return set()

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def fit(self, train: LabelledFeatures, val: LabelledFeatures) -> dict:
        """From U (the classifier as built), the penalty that scores best on validation."""
        (x, y), (xv, yv) = final_features(train), final_features(val)
        anchor = self.classifier.linear.weight.detach().float().cpu()
        fits: dict[float, torch.Tensor] = {}

        def score(penalty: float) -> tuple[float, float]:
            fits[penalty] = anchored_fit(x, y, anchor, penalty)
            return validation_score(xv @ fits[penalty].T, yv)

        penalty = log_search(score)
        with torch.no_grad():
            self.classifier.linear.weight.copy_(fits[penalty])
        return {"penalty": penalty}
