"""A finished run, rebuilt from its directory for evaluation and prediction.

The backbone is rebuilt by identity (the run stores its name and weights hash, not a copy) and
the run's own weights are loaded on top, verified by content hash and backbone identity.
"""
from __future__ import annotations

import glob
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.checkpoint import apply_weights, load_checkpoint, verify_run_files
from ..core.config import Config, to_dict
from ..core.emotions import Wheel
from ..core.files import RunError, not_a_run
from ..core.runtime import cache_dir_of, make_runtime
from ..data import DatasetSplits, eval_loader, make_dataset
from ..data.splits import load_run_splits
from ..data.images import ImageError, load_rgb, to_rgb
from ..data.readers import IMAGE_SUFFIXES
from ..models import StagedClassifier, build_model, method_class
from ..models.backbone import Backbone, backbone_from_config
from . import runfiles
from .evaluation import compute_metrics, predict

__all__ = ["ImagePrediction", "Prediction", "TrainedRun", "build_run_model", "image_sources", "load_run"]


def build_run_model(backbone: Backbone, wheel: Wheel, cfg: Config, text_weight: torch.Tensor) -> StagedClassifier:
    """The configured method's model built on the stage-1 text classifier U [C, D]: a shared
    classifier starts from it, and class queries (Cascade-CLIP-style) or a fixed text term
    (Tip-Adapter) are its rows."""
    embeddings = text_weight if method_class(cfg.model.method).needs_class_embeddings else None
    model = build_model(backbone, wheel.num_classes, cfg.model, class_embeddings=embeddings, class_names=wheel.classes)
    if model.shared_classifier:
        with torch.no_grad():
            model.classifier.linear.weight.copy_(text_weight)
    return model


@dataclass
class Prediction:
    labels: list[str]
    distributions: np.ndarray  # [N, C], columns in ``classes`` order
    classes: tuple[str, ...]
    # with predict(..., stages=True): each stage's own distribution [S, N, C], and the blocks each stage reads
    stage_distributions: Optional[np.ndarray] = None
    stage_blocks: Optional[list[list[int]]] = None


@dataclass
class ImagePrediction:
    """One input of a streamed prediction: its result, or why it could not be read."""

    source: str
    label: Optional[str] = None
    distribution: Optional[np.ndarray] = None  # [C]
    stage_distributions: Optional[np.ndarray] = None  # [S, C], when asked for
    error: Optional[str] = None


def image_sources(inputs: Sequence[str], list_file: Optional[str] = None) -> list[tuple[str, Optional[str]]]:
    """Image files from files, folders (searched recursively for image suffixes), glob patterns and
    a list file (one entry per line, ``-`` for stdin; blank lines and ``#`` comments skipped), in
    order, each as (path, error): an entry that names nothing gives an error, not a stop, so the
    other images are still predicted."""
    entries = list(inputs)
    if list_file is not None:
        try:
            text = sys.stdin.read() if list_file == "-" else Path(list_file).read_text(encoding="utf-8")
        except OSError as e:
            raise RunError(f"--from {list_file}: cannot read the list ({e.strerror})") from None
        entries += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out: list[tuple[str, Optional[str]]] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            out += [(p, None) for p in found] or [(entry, "folder holds no image files")]
        elif path.exists() or not glob.has_magic(entry):
            out.append((entry, None))  # a missing file is reported when it is read
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            out += [(m, None) for m in matches if Path(m).is_file()] or [(entry, "no file matches this pattern")]
    return out


class TrainedRun:
    """A finished run, rebuilt from its directory: backbone by identity plus the saved weights."""

    def __init__(self, run_dir: Path, device: Optional[str] = None, precision: Optional[str] = None) -> None:
        self.run_dir = Path(run_dir)
        for name in (runfiles.CONFIG, runfiles.INFO, "model.safetensors"):
            if not (self.run_dir / name).is_file():
                raise not_a_run(self.run_dir, name)
        runfiles.verify(self.run_dir, [runfiles.INFO, "text_classifier.safetensors", "model.safetensors"])
        self.cfg = runfiles.read_config(self.run_dir)
        info = runfiles.read_info(self.run_dir)
        verify_run_files(self.run_dir, info, to_dict(self.cfg))
        # Every file checked before anything is built: the stage-1 classifier, which the saved weights
        # replace where the method tuned it, and those weights.
        text_weight = load_checkpoint(self.run_dir / "text_classifier.safetensors", info["backbone"])["weight"]
        weights = load_checkpoint(self.run_dir / "model.safetensors", info["backbone"])
        if device is not None:
            self.cfg.device = device
        if precision is not None:
            self.cfg.precision = precision
        self.wheel = runfiles.info_wheel(info)
        self.backbone = backbone_from_config(self.cfg.backbone)
        if self.backbone.identity != info["backbone"]:
            raise RunError(f"{self.run_dir}: backbone differs from the one the run was trained with "
                           f"(run: {info['backbone'].get('weights')}, now: {self.backbone.identity.get('weights')}); "
                           "pass the same weights file")
        self.runtime = make_runtime(self.cfg)
        self.model = build_run_model(self.backbone, self.wheel, self.cfg, text_weight)
        self.stage_blocks = [list(stage) for stage in self.model.stages]
        if self.model.data_sized:  # a cache as large as the run's training split
            self.model.size_like({name: tensor.shape for name, tensor in weights.items()})
        apply_weights(self.model, weights, self.run_dir / "model.safetensors")
        self.model = self.runtime.prepare_model(self.model, evaluation_mode=True).eval()
        self.runtime.lower_frozen(self.runtime.unwrap_model(self.model))

    def _classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.runtime.autocast():
            out = self.model.forward_stages(images)
        return out.logits, out.stage_logits

    def evaluate(self, split: str = "test", progress: bool = True) -> dict:
        """Metrics on one of the run's own saved splits."""
        data: DatasetSplits = load_run_splits(self.run_dir / "splits", self.cfg.data, cache_dir_of(self.cfg))
        dataset = make_dataset(data[split], self.wheel, self.backbone.preprocess, self.cfg.data)
        preds = predict(self._classify, eval_loader(dataset, self.cfg.data, self.runtime), self.runtime,
                        progress=progress)
        return compute_metrics(preds, self.wheel)

    @torch.no_grad()
    def _distributions(self, images: torch.Tensor, stages: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Fused [N, C] and, with ``stages``, per-stage [S, N, C] distributions of a preprocessed batch."""
        logits, stage_logits = self._classify(images.to(self.runtime.device))
        fused = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        if not stages or stage_logits is None:
            return fused, None
        return fused, torch.softmax(stage_logits.float(), dim=-1).cpu().numpy()

    def predict(self, images: Sequence[str | Path | Image.Image] | torch.Tensor, stages: bool = False) -> Prediction:
        """Top emotion and predicted distribution for image files, PIL images or a preprocessed batch;
        with ``stages``, also each stage's own distribution. An unreadable image raises RunError
        (:meth:`predict_stream` reports it and goes on)."""
        if isinstance(images, torch.Tensor):
            probs, stage_probs = self._distributions(images, stages)
        else:
            results = list(self.predict_stream(images, stages=stages))
            bad = [r.error for r in results if r.error is not None]
            if bad:
                raise RunError(bad[0] + (f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""))
            probs = np.stack([r.distribution for r in results]).reshape(len(results), len(self.wheel.classes))
            with_stages = stages and results and results[0].stage_distributions is not None
            stage_probs = np.stack([r.stage_distributions for r in results], axis=1) if with_stages else None
        return Prediction([self.wheel.classes[i] for i in probs.argmax(axis=1)], probs, self.wheel.classes,
                          stage_probs, self.stage_blocks if stage_probs is not None else None)

    def predict_stream(self, images: Iterable[str | Path | Image.Image | tuple[str, Optional[str]]],
                       batch_size: Optional[int] = None, stages: bool = False) -> Iterator[ImagePrediction]:
        """One result per input, in order, computed in batches of ``batch_size`` (default: the run's
        evaluation batch): memory holds one batch whatever the number of images. An input that
        cannot be read yields its error and the others are still predicted. Inputs are files, PIL
        images, or (path, error) pairs as :func:`image_sources` gives them."""
        size = batch_size or self.cfg.data.eval_batch_size
        pending: list[tuple[str, Optional[torch.Tensor], Optional[str]]] = []
        ready = 0
        for item in images:
            source, error = item if isinstance(item, tuple) else (item, None)
            name = "<PIL image>" if isinstance(source, Image.Image) else str(source)
            tensor = None
            if error is None:
                try:
                    rgb = to_rgb(source) if isinstance(source, Image.Image) else \
                        load_rgb(source, max_pixels=self.cfg.data.max_image_pixels)
                    tensor = self.backbone.preprocess(rgb)
                except ImageError as e:
                    error = str(e)
            else:
                error = f"{name}: {error}"
            pending.append((name, tensor, error))
            ready += tensor is not None
            if ready == size:
                yield from self._predict_pending(pending, stages)
                pending, ready = [], 0
        yield from self._predict_pending(pending, stages)

    def _predict_pending(self, pending: list[tuple[str, Optional[torch.Tensor], Optional[str]]],
                         stages: bool) -> Iterator[ImagePrediction]:
        tensors = [t for _, t, _ in pending if t is not None]
        probs, stage_probs = self._distributions(torch.stack(tensors), stages) if tensors else (None, None)
        row = 0
        for name, tensor, error in pending:
            if tensor is None:
                yield ImagePrediction(name, error=error)
                continue
            yield ImagePrediction(name, self.wheel.classes[int(probs[row].argmax())], probs[row],
                                  None if stage_probs is None else stage_probs[:, row], None)
            row += 1


def load_run(run_dir: str | Path, device: Optional[str] = None, precision: Optional[str] = None) -> TrainedRun:
    """A trained model ready for ``.predict(images)`` and ``.evaluate(split)``; ``device`` and
    ``precision`` (fp32 | bf16 | fp16 autocast) replace the run's own settings."""
    return TrainedRun(Path(run_dir), device, precision)
