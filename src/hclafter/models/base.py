"""The interface every method's model declares, and what they share.

A model reads a prompted or plain CLIP ViT stage by stage and returns fused and per-stage
logits. Training, evaluation, the feature cache and the run directory only talk to this
interface: the class attributes say what a method can do, so no other module names a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
from torch import nn

from ..core.config import ModelConfig
from .backbone import Backbone


@dataclass
class ModelOutput:
    logits: torch.Tensor  # fused, [B, C]
    stage_logits: torch.Tensor  # [S, B, C]
    fusion_weights: Optional[torch.Tensor] = None  # [B, S], where the weights depend on the image


@dataclass
class LabelledFeatures:
    """A split's cached ``forward_features`` output, batch second as ``forward_head`` takes it
    ([layers, N, D]), with the split's labels [N]: what ``fit`` and ``select`` read."""

    features: torch.Tensor
    labels: torch.Tensor


class StagedClassifier(nn.Module):
    """Base of the stage-wise models.

    ``forward_features`` runs the image tower and whatever depends on it; ``forward_head`` turns
    that into logits. Training calls the module itself (so a DistributedDataParallel wrapper sees
    the pass); with ``from_features=True`` its input is cached ``forward_features`` output, batch
    first, which only models with ``supports_feature_cache`` accept.
    """

    # Whether the model has a ``classifier`` that starts from the stage-1 text classifier.
    shared_classifier: ClassVar[bool] = True
    # Whether ``forward_features`` is a fixed function of the image when no tower part trains.
    supports_feature_cache: ClassVar[bool] = False
    # The training groups that change what ``forward_features`` computes: the tower's own weights and,
    # where the prompts are visual (placed in the image tower), the prompts.
    feature_groups: ClassVar[frozenset[str]] = frozenset({"prompts", "layernorms", "backbone"})
    # False: no gradient step trains the model; ``fit`` sets its weights and the run has no stage-2 loop
    # (its phases do not apply), and ``fitted_groups`` are the groups the fit sets.
    trained_by_gradient: ClassVar[bool] = True
    fitted_groups: ClassVar[frozenset[str]] = frozenset()
    # Whether ``fit`` and ``select`` read the cached features of the training and validation splits
    # (the run then needs the feature cache).
    uses_split_features: ClassVar[bool] = False
    # Tensors whose first dimension is the number of training images (a cache of training features):
    # built empty, sized by ``fit`` or, before a run's saved weights are loaded, by ``size_like``.
    data_sized: ClassVar[tuple[str, ...]] = ()
    # Whether the model needs the stage-1 class text embeddings to be built.
    needs_class_embeddings: ClassVar[bool] = False
    # Stage rules: may stages share a layer; must they be consecutive runs covering 1..L in order.
    allows_shared_layers: ClassVar[bool] = False
    needs_consecutive_cover: ClassVar[bool] = False
    # Top-level submodule → training group (the tower's parameters are grouped apart).
    group_owners: ClassVar[dict[str, str]] = {}
    # Top-level submodules indexed by stage (their parameters belong to one stage each).
    stage_owned: ClassVar[tuple[str, ...]] = ()

    visual: nn.Module
    stages: list[list[int]]
    extraction_layers: list[int]

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "StagedClassifier":
        raise NotImplementedError

    @classmethod
    def fixed_features(cls, cfg: ModelConfig, tuned: set[str]) -> bool:
        """Whether ``forward_features`` is the same function of the image whatever the run's seed, while
        the groups ``tuned`` train, so that it can be cached on disk: no visual prompts (their values are
        the run's own), nothing in ``feature_groups`` tuned."""
        return (cls.supports_feature_cache and not tuned & cls.feature_groups
                and ("prompts" not in cls.feature_groups or cfg.prompt_tokens == 0))

    @classmethod
    def check_stages(cls, stages: Sequence[Sequence[int]], depth: int) -> list[list[int]]:
        """The one stage validator (configs and constructors alike): ValueError naming the stage and
        the rule; returns the stages in the model's order (depth order within a stage)."""
        stages = [list(stage) for stage in stages]
        if not stages or any(not stage for stage in stages):
            raise ValueError(f"model.stages = {stages}: a non-empty list of non-empty layer lists is required")
        for i, stage in enumerate(stages):
            if any(not 1 <= layer <= depth for layer in stage) or len(set(stage)) != len(stage):
                raise ValueError(f"model.stages[{i}] = {stage}: layers must be distinct numbers in 1..{depth} "
                                 f"(the backbone has {depth} image blocks)")
        flat = [layer for stage in stages for layer in stage]
        if cls.needs_consecutive_cover and flat != list(range(1, depth + 1)):
            raise ValueError(f"model.stages = {stages}: this method needs consecutive groups of blocks covering "
                             f"1..{depth} in order, e.g. [[1,2,3,4],[5,6,7,8],[9,10,11],[12]] for 12 blocks")
        if not cls.allows_shared_layers and len(set(flat)) != len(flat):
            raise ValueError(f"model.stages = {stages}: stages may not share layers for this method")
        return stages if cls.needs_consecutive_cover else [sorted(stage) for stage in stages]

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        """The training groups in which the model built from ``cfg`` on a tower of ``depth`` blocks has a
        parameter that can receive a gradient ("backbone" aside, which follows the tower's LayerNorms):
        every phase must train one of them."""
        raise NotImplementedError

    def inert_parameters(self) -> set[str]:
        """Parameters that no loss can move, whatever trains: they are not counted as trained."""
        return set()

    def fit(self, train: LabelledFeatures, val: LabelledFeatures) -> dict:
        """Set, from the frozen tower's features, what no gradient step trains (the whole model where
        ``trained_by_gradient`` is False), choosing on the validation split what must be chosen; it
        runs before training and never sees the test split. Returns the choices made, for summary.json.
        Nothing to fit by default."""
        return {}

    def select(self, val: LabelledFeatures) -> dict:
        """After each epoch, choose on the validation split the settings of the model's predictions that
        no gradient sets (the epoch's validation and its checkpoint then use them); returns them.
        Nothing to choose by default."""
        return {}

    def size_like(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Give the ``data_sized`` tensors the shapes a saved run has for them, so its weights load."""
        tensors = self.state_dict(keep_vars=True)
        for name in self.data_sized:
            if name in shapes:
                tensors[name].data = tensors[name].new_zeros(tuple(shapes[name]))

    def forward_features(self, images: torch.Tensor) -> Any:
        raise NotImplementedError

    def forward_head(self, features: Any) -> ModelOutput:
        raise NotImplementedError

    def forward_stages(self, images: torch.Tensor) -> ModelOutput:
        return self.forward_head(self.forward_features(images))

    def forward(self, inputs: torch.Tensor, return_stages: bool = False,
                from_features: bool = False) -> torch.Tensor | ModelOutput:
        if from_features:
            if not self.supports_feature_cache:
                raise TypeError(f"{type(self).__name__} does not support cached features")
            out = self.forward_head(inputs.transpose(0, 1))
        else:
            out = self.forward_stages(inputs)
        return out if return_stages else out.logits

    def param_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Parameters by training group: the tower's LayerNorms → "layernorms", its other weights →
        "backbone", everything else by its top-level module through ``group_owners``."""
        layernorm_ids = {id(p) for m in self.visual.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        groups: dict[str, dict[str, nn.Parameter]] = {}
        for name, param in self.named_parameters():
            head = name.split(".", 1)[0]
            if head == "visual":
                group = "layernorms" if id(param) in layernorm_ids else "backbone"
            else:
                group = self.group_owners[head]
            groups.setdefault(group, {})[name] = param
        return groups

    def stage_of_parameter(self, name: str) -> Optional[int]:
        """1-based stage owning a parameter; None for shared ones."""
        head, _, rest = name.partition(".")
        return int(rest.split(".", 1)[0]) + 1 if head in self.stage_owned else None

    def nga_weights(self) -> list[list[float]]:
        """Each stage's layer weights, in depth order."""
        return [m.weights().tolist() for m in self.nga]

    def fusion_weights(self) -> Optional[list[float]]:
        """The stages' fusion weights; None where the stage scores are not fused by learned weights."""
        return self.fusion.weights().tolist()
