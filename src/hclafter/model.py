"""HybridCascade-LaFTer: the whole forward pass.

images → patch embedding (+ visual prompts) → CLS after each extraction layer, through the
tower's own ln_post/proj → per-stage NGA → stage adapters → shared text-trained classifier →
learned fusion of the stage logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .adapters import StageAdapter
from .backbone import Backbone
from .classifier import TextClassifier
from .config import ModelConfig
from .features import check_vit, cls_after_blocks, embed_patches, project
from .fusion import StageFusion
from .nga import NGA, MeanAggregation
from .prompts import VisualPrompts

__all__ = ["HybridCascadeLaFTer", "ModelOutput", "NGA", "StagedClassifier", "build_model"]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # fused, [B, C]
    stage_logits: torch.Tensor  # [S, B, C]


class StagedClassifier(nn.Module):
    """Common call interface of the stage-wise models. Training calls the module itself (so that a
    DistributedDataParallel wrapper sees the forward pass) with ``return_stages=True``; inputs of
    shape [B, layers, D] are cached layer features, for models that have a ``head``."""

    def forward_stages(self, images: torch.Tensor) -> ModelOutput:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor, return_stages: bool = False) -> torch.Tensor | ModelOutput:
        out = self.head(inputs.transpose(0, 1)) if inputs.ndim == 3 else self.forward_stages(inputs)
        return out if return_stages else out.logits


class HybridCascadeLaFTer(StagedClassifier):
    """Multi-stage CLS features of a prompted CLIP ViT, classified by one shared text classifier.

    With ``stages=[[L]]`` and no adapters it is plain LaFTer (final layer only).
    """

    def __init__(self, backbone: Backbone, num_classes: int, prompt_tokens: int = 50,
                 stages: Sequence[Sequence[int]] = ((5, 6, 7), (8, 9), (10, 11, 12)),
                 stage_adapters: bool = True, nga_init_sigma: float = 1.0, prompt_dropout: float = 0.0,
                 normalize_features: bool = True, aggregation: str = "nga") -> None:
        super().__init__()
        self.visual = backbone.model.visual
        depth = check_vit(self.visual)
        self.stages = [sorted(stage) for stage in stages]
        for i, stage in enumerate(self.stages):
            bad = [layer for layer in stage if not 1 <= layer <= depth]
            if bad or len(set(stage)) != len(stage):
                raise ValueError(f"model.stages[{i}] = {stage}: layers must be distinct numbers in 1..{depth} "
                                 f"(this backbone has {depth} blocks)")
        self.extraction_layers = sorted({layer for stage in self.stages for layer in stage})
        # Positions of each stage's layers in the stacked layer-feature tensor.
        self._stage_index = [[self.extraction_layers.index(layer) for layer in stage] for stage in self.stages]

        width = self.visual.conv1.out_channels
        dim = self.visual.output_dim
        patch = self.visual.conv1.kernel_size[0]
        self.prompts = VisualPrompts(prompt_tokens, width, patch, prompt_dropout) if prompt_tokens > 0 else None
        if aggregation not in ("nga", "mean"):
            raise ValueError(f"model.aggregation: {aggregation!r} is not one of nga, mean")
        self.nga = nn.ModuleList(NGA(len(stage), nga_init_sigma) if aggregation == "nga" else MeanAggregation(len(stage))
                                 for stage in self.stages)
        self.adapters = nn.ModuleList(StageAdapter(dim) for _ in self.stages) if stage_adapters else None
        self.classifier = TextClassifier(dim, num_classes, normalize_features)
        self.fusion = StageFusion(len(self.stages))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → the first block's input tokens, visual prompts included: [B, N, W]."""
        tokens = embed_patches(self.visual, images)
        return self.prompts(tokens) if self.prompts is not None else tokens

    def layer_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → [len(extraction_layers), B, D]."""
        return project(self.visual, cls_after_blocks(self.visual, self.embed(images), self.extraction_layers))

    def head(self, features: torch.Tensor) -> ModelOutput:
        """Everything after the encoder: [n, B, D] layer features → fused and per-stage logits."""
        stage_logits = []
        for s, index in enumerate(self._stage_index):
            z = self.nga[s](features[index])
            if self.adapters is not None:
                z = self.adapters[s](z)
            stage_logits.append(self.classifier(z))
        stacked = torch.stack(stage_logits)
        return ModelOutput(self.fusion(stacked), stacked)

    def forward_stages(self, images: torch.Tensor) -> ModelOutput:
        return self.head(self.layer_features(images))

    def param_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Parameters by training group: the phase schedule and learning rates address these names."""
        layernorm_ids = {id(p) for m in self.visual.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        owners = {"prompts.": "prompts", "classifier.": "classifier", "adapters.": "stage_adapters",
                  "fusion.": "fusion", "nga.": "nga"}
        groups: dict[str, dict[str, nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if name.startswith("visual."):
                group = "layernorms" if id(param) in layernorm_ids else "backbone"
            else:
                group = next(g for prefix, g in owners.items() if name.startswith(prefix))
            groups.setdefault(group, {})[name] = param
        return groups

    def stage_of_parameter(self, name: str) -> Optional[int]:
        """1-based stage owning a parameter (its NGA σ, its adapter); None for shared ones."""
        parts = name.split(".")
        return int(parts[1]) + 1 if parts[0] in ("nga", "adapters") else None

    def nga_weights(self) -> list[list[float]]:
        return [m.weights().tolist() for m in self.nga]

    def fusion_weights(self) -> list[float]:
        return self.fusion.weights().tolist()


def build_model(backbone: Backbone, num_classes: int, cfg: Optional[ModelConfig] = None,
                class_embeddings: Optional[torch.Tensor] = None) -> nn.Module:
    """The model ``cfg.method`` names; ``class_embeddings`` ([C, D] stage-1 text embeddings) feed
    Cascade-CLIP's class queries and are required for it alone."""
    # Imported here: the baseline modules import ModelOutput from this module.
    from .cascadeclip import CascadeCLIPClassifier
    from .segmented import SegmentedLaFTer

    cfg = cfg or ModelConfig()
    if cfg.method == "hybrid":
        return HybridCascadeLaFTer(backbone, num_classes, prompt_tokens=cfg.prompt_tokens, stages=cfg.stages,
                                   stage_adapters=cfg.stage_adapters, nga_init_sigma=cfg.nga_init_sigma,
                                   prompt_dropout=cfg.prompt_dropout, normalize_features=cfg.normalize_features,
                                   aggregation=cfg.aggregation)
    if cfg.method == "segmented":
        return SegmentedLaFTer(backbone, num_classes, stages=cfg.stages, stage_prompt_tokens=cfg.stage_prompt_tokens,
                               nga_init_sigma=cfg.nga_init_sigma, prompt_dropout=cfg.prompt_dropout,
                               normalize_features=cfg.normalize_features, aggregation=cfg.aggregation)
    if cfg.method == "cascadeclip":
        if cfg.aggregation != "nga":
            raise ValueError(f"model.aggregation={cfg.aggregation} does not apply to model.method=cascadeclip: "
                             "it learns its own unnormalised layer weights")
        if class_embeddings is None:
            raise ValueError("model.method=cascadeclip needs class_embeddings (the [classes, embed_dim] stage-1 text "
                             "embeddings) for its class queries")
        return CascadeCLIPClassifier(backbone, num_classes, class_embeddings, stages=cfg.stages,
                                     decoder_layers=cfg.decoder_layers, decoder_heads=cfg.decoder_heads,
                                     prompt_tokens=cfg.prompt_tokens, prompt_dropout=cfg.prompt_dropout)
    raise ValueError(f"model.method: {cfg.method!r} is not one of hybrid, segmented, cascadeclip")
