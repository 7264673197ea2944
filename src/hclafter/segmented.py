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

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .backbone import Backbone
from .classifier import TextClassifier
from .features import check_vit, embed_patches
from .fusion import StageFusion
from .model import ModelOutput, StagedClassifier
from .nga import NGA, MeanAggregation
from .prompts import VisualPrompts

__all__ = ["SegmentedLaFTer", "group_parameters", "stage_projection"]


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


def group_parameters(model: nn.Module, owners: dict[str, str]) -> dict[str, dict[str, nn.Parameter]]:
    """Parameters by training group: the tower's LayerNorms → "layernorms", its other weights →
    "backbone", everything else by its top-level module name through ``owners``."""
    layernorm_ids = {id(p) for m in model.visual.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups: dict[str, dict[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        head = name.split(".", 1)[0]
        if head == "visual":
            group = "layernorms" if id(param) in layernorm_ids else "backbone"
        else:
            group = owners[head]
        groups.setdefault(group, {})[name] = param
    return groups


def check_segments(stages: Sequence[Sequence[int]], depth: int) -> list[list[int]]:
    """Stages must be non-empty runs of consecutive blocks that cover 1..L in order."""
    stages = [list(stage) for stage in stages]
    flat = [layer for stage in stages for layer in stage]
    if any(not stage for stage in stages) or flat != list(range(1, depth + 1)):
        raise ValueError(f"model.stages = {stages}: the segmented method needs consecutive groups of blocks "
                         f"covering 1..{depth} in order (this backbone has {depth} blocks), "
                         "e.g. [[1,2,3,4],[5,6,7,8],[9,10,11],[12]]")
    return stages


class SegmentedLaFTer(StagedClassifier):
    """Stage-wise prompts inserted at stage starts; per-stage NGA, projection; shared classifier; fusion."""

    def __init__(self, backbone: Backbone, num_classes: int,
                 stages: Sequence[Sequence[int]] = ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11), (12,)),
                 stage_prompt_tokens: int = 16, nga_init_sigma: float = 1.0, prompt_dropout: float = 0.0,
                 normalize_features: bool = True, aggregation: str = "nga") -> None:
        super().__init__()
        self.visual = backbone.model.visual
        self.stages = check_segments(stages, check_vit(self.visual))
        self.extraction_layers = [layer for stage in self.stages for layer in stage]
        if aggregation not in ("nga", "mean"):
            raise ValueError(f"model.aggregation: {aggregation!r} is not one of nga, mean")
        if stage_prompt_tokens < 0:
            raise ValueError(f"model.stage_prompt_tokens must be >= 0, got {stage_prompt_tokens}")

        width = self.visual.conv1.out_channels
        patch = self.visual.conv1.kernel_size[0]
        self.prompts = (nn.ModuleList(VisualPrompts(stage_prompt_tokens, width, patch, prompt_dropout)
                                      for _ in self.stages) if stage_prompt_tokens > 0 else None)
        self.nga = nn.ModuleList(NGA(len(stage), nga_init_sigma) if aggregation == "nga"
                                 else MeanAggregation(len(stage)) for stage in self.stages)
        self.projections = nn.ModuleList(stage_projection(self.visual) for _ in self.stages)
        self.classifier = TextClassifier(self.visual.output_dim, num_classes, normalize_features)
        self.fusion = StageFusion(len(self.stages))

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per stage, the NGA-aggregated CLS tokens of its blocks mapped to the joint space: S × [B, D]."""
        x = embed_patches(self.visual, images)  # [B, 1 + N, W]
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        blocks = self.visual.transformer.resblocks
        features = []
        for s, stage in enumerate(self.stages):
            if self.prompts is not None:
                x = self.prompts[s](x)  # right after CLS, ahead of earlier stages' prompts
            cls_tokens = []
            for layer in stage:
                x = blocks[layer - 1](x) if batch_first else blocks[layer - 1](x.transpose(0, 1)).transpose(0, 1)
                cls_tokens.append(x[:, 0])
            features.append(self.projections[s](self.nga[s](torch.stack(cls_tokens))))
        return features

    def forward_stages(self, images: torch.Tensor) -> ModelOutput:
        stage_logits = torch.stack([self.classifier(z) for z in self.stage_features(images)])
        return ModelOutput(self.fusion(stage_logits), stage_logits)

    def param_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Parameters by training group (see ``config.PARAM_GROUPS``)."""
        return group_parameters(self, {"prompts": "prompts", "nga": "nga", "projections": "projections",
                                       "classifier": "classifier", "fusion": "fusion"})

    def stage_of_parameter(self, name: str) -> Optional[int]:
        """1-based stage owning a parameter (its prompts, σ, projection); None for shared ones."""
        head, _, rest = name.partition(".")
        return int(rest.split(".", 1)[0]) + 1 if head in ("prompts", "nga", "projections") else None

    def nga_weights(self) -> list[list[float]]:
        return [m.weights().tolist() for m in self.nga]

    def fusion_weights(self) -> list[float]:
        return self.fusion.weights().tolist()
