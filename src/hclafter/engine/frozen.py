"""The baselines without a stage-2 loop, on plain CLIP image features: zero-shot CLIP
(``mode=zeroshot``: template embeddings at CLIP's own temperature), the stage-1 text-only
classifier (``mode=textonly``), and the methods fitted on the frozen tower's cached features
without gradient steps (the linear probes, Tip-Adapter: their models' ``fit``). A run of one
writes the same files as a trained run."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..core.checkpoint import save_checkpoint
from ..core.config import Config
from ..core.emotions import Wheel
from ..core.files import writing
from ..core.runtime import Runtime, cache_dir_of, make_runtime
from ..data import SPLITS, DatasetSplits, eval_loader, load_splits, make_dataset
from ..models.backbone import Backbone, backbone_from_config
from ..models.text import load_templates, train_stage1, zeroshot_weights
from . import runfiles, tracking
from .evaluation import Classify, clip_classifier, compute_metrics, efficiency, evaluate_classifier, predict
from .inference import build_run_model
from .inputs import training_inputs
from .optim import param_groups, saved_parameter_names, trained_parameters


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
                    cache: Path, show: bool, started: float, evaluate_test: bool = True) -> dict:
    """A zero-shot or text-only run: val and test (unless ``evaluate_test`` is false) metrics and
    predictions, no training."""
    classify, stage1 = frozen_classifier(cfg, backbone, data.wheel, runtime, cache)
    loaders = {split: eval_loader(make_dataset(data[split], data.wheel, backbone.preprocess, cfg.data), cfg.data,
                                  runtime) for split in _evaluated(evaluate_test)}
    return _write_run(cfg, out_dir, backbone, data, runtime, show, started, classify, loaders, classify,
                      {"stage1": stage1, "parameters": {"trained": 0, "added": 0, "by_group": {}}})


def fit_frozen(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, runtime: Runtime, cache: Path,
               show: bool, started: float, evaluate_test: bool = True) -> dict:
    """A run of a method without gradient steps (``trained_by_gradient`` False): stage 1, the model's
    ``fit`` on the cached features of the training split with its choices made on validation (recorded
    in summary.json as ``selection``), then val and test (unless ``evaluate_test`` is false) as any run."""
    text_weight, stage1 = train_stage1(backbone, data.wheel, cfg.text, cfg.seed, cache, runtime.device)
    model = build_run_model(backbone, data.wheel, cfg, text_weight)
    inputs = training_inputs(cfg, backbone, data, model, runtime, cache, show)
    selection = model.fit(inputs.features("train"), inputs.features("val"))
    model.eval()
    runtime.lower_frozen(model)
    if runtime.is_main_process:
        state = model.state_dict()
        weights = {n: state[n].float() for n in saved_parameter_names(model, cfg)}
        with writing(out_dir):
            save_checkpoint(out_dir / "text_classifier.safetensors", {"weight": text_weight}, backbone.identity)
            save_checkpoint(out_dir / "model.safetensors", weights, backbone.identity)

    def classify(batch: torch.Tensor, from_features: bool = True):
        with runtime.autocast():
            out = model(batch, return_stages=True, from_features=from_features)
        return out.logits, out.stage_logits

    loaders = {split: eval_loader(inputs.datasets[split], cfg.data, runtime) for split in _evaluated(evaluate_test)}
    return _write_run(cfg, out_dir, backbone, data, runtime, show, started, classify, loaders,
                      lambda images: classify(images, from_features=False),
                      {"stage1": stage1, "parameters": trained_parameters(model, param_groups(model), cfg),
                       "selection": selection},
                      extraction_layers=model.extraction_layers, stages=model.stages)


def _evaluated(evaluate_test: bool) -> tuple[str, ...]:
    return ("val", "test") if evaluate_test else ("val",)


def _write_run(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, runtime: Runtime, show: bool,
               started: float, classify: Classify, loaders: dict[str, DataLoader], on_images: Classify, results: dict,
               **info) -> dict:
    """Val and test predictions of ``classify`` over ``loaders`` (test only if it has one), then the run's files:
    predictions, run.json
    (the efficiency of ``on_images`` on test images, and ``info``) and, last, summary.json (the metrics,
    ``results``, and what every run's summary says of its data)."""
    wheel = data.wheel
    preds = {split: predict(classify, loaders[split], runtime, desc=f"eval {split}", progress=show)
             for split in loaders}
    images = torch.stack([make_dataset(data["test"][:8], wheel, backbone.preprocess, cfg.data)[i]["image"]
                          for i in range(min(8, len(data["test"])))]).to(runtime.device)
    summary = {**{split: compute_metrics(p, wheel) for split, p in preds.items()}, **results, "epochs": 0,
               "num_samples": {s: len(data[s]) for s in SPLITS}, "absent_classes": data.absent_classes(),
               "skipped": data.skipped_summary()}
    if runtime.is_main_process:
        with writing(out_dir):
            for split, p in preds.items():
                runfiles.write_predictions(out_dir, split, p, data[split], wheel)
        runfiles.write_info(out_dir, cfg, wheel, backbone.identity, started, hardware=tracking.hardware(runtime),
                            efficiency=efficiency(on_images, images), **info)
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
