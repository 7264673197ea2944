"""A finished run, rebuilt from its directory for evaluation and prediction.

The backbone is rebuilt by identity (the run stores its name and weights hash, not a copy) and
the run's own weights are loaded on top, verified by content hash and backbone identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .backbone import Backbone, backbone_from_config
from .checkpoint import load_checkpoint, load_weights, verify_run_files
from .config import Config, load_config, to_dict
from .data import DatasetSplits, eval_loader, load_split_files, make_dataset
from .data.images import ImageError, load_rgb, to_rgb
from .emotions import Wheel
from .evaluation import compute_metrics, predict
from .files import RunError, read_json
from .models import StagedClassifier, build_model, method_class
from .runtime import make_runtime

__all__ = ["Prediction", "TrainedRun", "build_run_model", "load_run"]


def build_run_model(backbone: Backbone, wheel: Wheel, cfg: Config, text_weight: torch.Tensor) -> StagedClassifier:
    """The configured method's model built on the stage-1 text classifier U [C, D]: a shared
    classifier starts from it, and class queries (Cascade-CLIP-style) are its rows."""
    embeddings = text_weight if method_class(cfg.model.method).needs_class_embeddings else None
    model = build_model(backbone, wheel.num_classes, cfg.model, class_embeddings=embeddings)
    if model.shared_classifier:
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
        info = read_json(self.run_dir / "run.json")
        verify_run_files(self.run_dir, info, to_dict(self.cfg))
        if device is not None:
            self.cfg.device = device
        if precision is not None:
            self.cfg.precision = precision
        w = info["wheel"]
        self.wheel = Wheel(w["name"], tuple(w["classes"]), tuple(w["polarity"]),
                           tuple(map(tuple, w["distances"])) if w.get("distances") else None)
        self.backbone = backbone_from_config(self.cfg.backbone)
        if self.backbone.identity != info["backbone"]:
            raise RunError(f"{self.run_dir}: backbone differs from the one the run was trained with "
                           f"(run: {info['backbone'].get('weights')}, now: {self.backbone.identity.get('weights')}); "
                           "pass the same weights file")
        self.runtime = make_runtime(self.cfg)
        # The stage-1 classifier, which the saved weights replace where the method tuned it.
        text_weight = load_checkpoint(self.run_dir / "text_classifier.safetensors", self.backbone.identity)["weight"]
        self.model = build_run_model(self.backbone, self.wheel, self.cfg, text_weight)
        load_weights(self.model, self.run_dir / "model.safetensors", self.backbone.identity)
        self.model = self.runtime.prepare_model(self.model, evaluation_mode=True).eval()

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
