"""The baselines without image training, on plain CLIP image features: zero-shot CLIP
(``mode=zeroshot``: template embeddings at CLIP's own temperature) and the stage-1 text-only
classifier (``mode=textonly``). A run of one writes the same files as a trained run."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..core.config import Config
from ..core.emotions import Wheel
from ..core.files import writing
from ..core.runtime import Runtime, cache_dir_of, make_runtime
from ..data import SPLITS, DatasetSplits, eval_loader, load_splits, make_dataset
from ..models.backbone import Backbone, backbone_from_config
from ..models.text import load_templates, train_stage1, zeroshot_weights
from . import runfiles, tracking
from .evaluation import Classify, clip_classifier, compute_metrics, efficiency, evaluate_classifier, predict


def frozen_classifier(cfg: Config, backbone: Backbone, wheel: Wheel, runtime: Runtime,
                      cache: Path) -> tuple[Classify, Optional[dict]]:
    """Zero-shot CLIP or the stage-1 text classifier (by ``cfg.mode``), with the stage-1 summary
    for the latter."""
    if cfg.mode == "zeroshot":
        weight = zeroshot_weights(backbone, wheel, load_templates(wheel, cfg.text.templates), cache, runtime.device)
        scale, stage1 = backbone.model.logit_scale.exp().item(), None
    else:
        weight, stage1 = train_stage1(backbone, wheel, cfg.text, cfg.seed, cache, runtime.device)
        scale = 1.0
    model = runtime.prepare_model(backbone.model, evaluation_mode=True).eval()
    runtime.lower_frozen(backbone.model)
    return clip_classifier(model, weight, scale, runtime), stage1


def evaluate_frozen(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, runtime: Runtime,
                    cache: Path, show: bool, started: float) -> dict:
    """A zero-shot or text-only run: val and test metrics and predictions, no training."""
    wheel = data.wheel
    classify, stage1 = frozen_classifier(cfg, backbone, wheel, runtime, cache)
    results, preds = {}, {}
    for split in ("val", "test"):
        dataset = make_dataset(data[split], wheel, backbone.preprocess, cfg.data)
        preds[split] = predict(classify, eval_loader(dataset, cfg.data, runtime), runtime, desc=f"eval {split}",
                               progress=show)
        results[split] = compute_metrics(preds[split], wheel)
    images = torch.stack([make_dataset(data["test"][:8], wheel, backbone.preprocess, cfg.data)[i]["image"]
                          for i in range(min(8, len(data["test"])))]).to(runtime.device)
    summary = {"val": results["val"], "test": results["test"], "stage1": stage1, "epochs": 0,
               "parameters": {"trained": 0, "added": 0, "by_group": {}},
               "num_samples": {s: len(data[s]) for s in SPLITS}, "absent_classes": data.absent_classes(),
               "skipped": data.skipped_summary()}
    if runtime.is_main_process:
        with writing(out_dir):
            runfiles.write_predictions(out_dir, "test", preds["test"], data["test"], wheel)
            runfiles.write_predictions(out_dir, "val", preds["val"], data["val"], wheel)
        runfiles.write_info(out_dir, cfg, wheel, backbone.identity, started, hardware=tracking.hardware(runtime),
                            efficiency=efficiency(classify, images))
        runfiles.write_summary(out_dir, summary)
    return summary


def zeroshot_eval(cfg: Config, split: str = "test", progress: bool = True) -> dict:
    """Zero-shot CLIP on one split: cosine similarity to each class's averaged template embedding."""
    runtime = make_runtime(cfg)
    cache = cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    data = load_splits(cfg.data, cfg.seed, cache)
    classify, _ = frozen_classifier(dataclasses.replace(cfg, mode="zeroshot"), backbone, data.wheel, runtime, cache)
    dataset = make_dataset(data[split], data.wheel, backbone.preprocess, cfg.data)
    return evaluate_classifier(classify, dataset, cfg.data, data.wheel, runtime, progress, f"eval {split}")
