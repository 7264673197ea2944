"""A finished run, rebuilt from its directory for evaluation and prediction.

The backbone is rebuilt by identity (the run stores its name and weights hash, not a copy) and
the run's own weights are loaded on top, verified by content hash and backbone identity.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .backbone import Backbone, backbone_from_config
from .checkpoint import load_weights
from .config import Config, load_config
from .data import DatasetSplits, eval_loader, load_split_files, make_dataset
from .data.images import ImageError, load_rgb, to_rgb
from .emotions import Wheel
from .evaluation import compute_metrics, predict
from .files import RunError
from .models import StagedClassifier, build_model, method_class
from .runtime import cache_dir_of, make_runtime
from .text import load_templates, zeroshot_weights

__all__ = ["Prediction", "TrainedRun", "build_run_model", "load_run"]


def build_run_model(backbone: Backbone, wheel: Wheel, cfg: Config, cache: Path, device: torch.device,
                    text_weight: Optional[torch.Tensor] = None) -> StagedClassifier:
    """The configured method's model; a shared classifier starts from the stage-1 weights."""
    class_embeddings = None
    if method_class(cfg.model.method).needs_class_embeddings:
        class_embeddings = zeroshot_weights(backbone, wheel, load_templates(wheel, cfg.text.templates), cache, device)
    model = build_model(backbone, wheel.num_classes, cfg.model, class_embeddings=class_embeddings)
    if text_weight is not None and model.shared_classifier:
        with torch.no_grad():
            model.classifier.linear.weight.copy_(text_weight)
    return model


@dataclass
class Prediction:
    labels: list[str]
    distributions: np.ndarray  # [N, C], columns in ``classes`` order
    classes: tuple[str, ...]


class TrainedRun:
    """A finished run, rebuilt from its directory: backbone by identity plus the saved weights."""

    def __init__(self, run_dir: Path, device: Optional[str] = None, precision: Optional[str] = None) -> None:
        self.run_dir = Path(run_dir)
        for name in ("config.yaml", "run.json", "model.safetensors"):
            if not (self.run_dir / name).is_file():
                raise RunError(f"{self.run_dir} is not a finished run: {name} is missing")
        self.cfg = load_config([self.run_dir / "config.yaml"])
        if device is not None:
            self.cfg.device = device
        if precision is not None:
            self.cfg.precision = precision
        info = json.loads((self.run_dir / "run.json").read_text(encoding="utf-8"))
        w = info["wheel"]
        self.wheel = Wheel(w["name"], tuple(w["classes"]), tuple(w["polarity"]),
                           tuple(map(tuple, w["distances"])) if w.get("distances") else None)
        self.backbone = backbone_from_config(self.cfg.backbone)
        if self.backbone.identity != info["backbone"]:
            raise RunError(f"{self.run_dir}: backbone differs from the one the run was trained with "
                           f"(run: {info['backbone'].get('weights')}, now: {self.backbone.identity.get('weights')}); "
                           "pass the same weights file")
        self.runtime = make_runtime(self.cfg)
        self.model = build_run_model(self.backbone, self.wheel, self.cfg, cache_dir_of(self.cfg), self.runtime.device)
        load_weights(self.model, self.run_dir / "model.safetensors", self.backbone.identity)
        self.model = self.runtime.prepare_model(self.model, evaluation_mode=True).eval()
        self.runtime.lower_frozen(self.runtime.unwrap_model(self.model))

    def _classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.runtime.autocast():
            out = self.model.forward_stages(images)
        return out.logits, out.stage_logits

    def evaluate(self, split: str = "test", progress: bool = True) -> dict:
        """Metrics on one of the run's own saved splits."""
        data: DatasetSplits = load_split_files(self.run_dir / "splits", self.wheel)
        if split not in data.splits:
            raise RunError(f"{self.run_dir}/splits has no {split}.csv")
        dataset = make_dataset(data[split], self.wheel, self.backbone.preprocess, self.cfg.data)
        preds = predict(self._classify, eval_loader(dataset, self.cfg.data, self.runtime), self.runtime,
                        progress=progress)
        return compute_metrics(preds, self.wheel)

    @torch.no_grad()
    def predict(self, images: Sequence[str | Path | Image.Image] | torch.Tensor) -> Prediction:
        """Top emotion and predicted distribution for image files, PIL images or a preprocessed batch."""
        if not isinstance(images, torch.Tensor):
            tensors = []
            for image in images:
                try:
                    rgb = to_rgb(image) if isinstance(image, Image.Image) else load_rgb(image)
                except ImageError as e:
                    raise RunError(str(e)) from None
                tensors.append(self.backbone.preprocess(rgb))
            images = torch.stack(tensors)
        logits, _ = self._classify(images.to(self.runtime.device))
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Prediction([self.wheel.classes[i] for i in probs.argmax(axis=1)], probs, self.wheel.classes)


def load_run(run_dir: str | Path, device: Optional[str] = None, precision: Optional[str] = None) -> TrainedRun:
    """A trained model ready for ``.predict(images)`` and ``.evaluate(split)``; ``device`` and
    ``precision`` (fp32 | bf16 | fp16 autocast) replace the run's own settings."""
    return TrainedRun(Path(run_dir), device, precision)
