"""A run end to end: set-up → stage 1 → the stage-2 loop → finish, in a crash-safe run directory.

A run's resumable state (weights, optimizer, scheduler, epoch and step, every random stream) is
saved atomically after every epoch and every ``train.checkpoint_every_steps`` steps, in
``checkpoints/step-N/`` with ``checkpoints/latest.json`` pointing at the newest complete one;
``train_run(..., resume=True)`` continues from it and ends with the same summary as an
uninterrupted run. The frozen baselines (zero-shot CLIP, the text-only classifier) run here too.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from .version import __version__
from .backbone import Backbone, backbone_from_config
from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .config import Config, load_config, to_dict, tuned_groups
from .data import SPLITS, DatasetSplits, eval_loader, load_splits, make_dataset, make_loader, write_manifest
from .data.loading import cache_applies, cached_datasets
from .data.store import crop_flip_transform, stored_datasets
from .emotions import Wheel
from .evaluation import Classify, Predictions, clip_classifier, efficiency, evaluate_classifier, predict
from .files import RunError, atomic_write_text, write_json, writing
from .inference import build_run_model
from .metrics import HEADLINE
from .plots import plot_confusion, plot_curves, plot_stage_weights
from .runtime import Runtime, cache_dir_of, make_runtime
from .text import load_templates, train_stage1, zeroshot_weights
from .training import (TrainingInterrupted, TrainState, build_optimizer, fit, param_groups,
                       saved_parameter_names, set_trainable, strong_view, warmup_cosine)

__all__ = ["RunError", "TrainingInterrupted", "train_run", "zeroshot_eval"]


def train_run(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Stage 1 + stage 2 on the configured data (or a frozen baseline, by ``cfg.mode``); writes the
    run directory and returns the summary."""
    started = time.time()
    out_dir = Path(out_dir)
    _resolve_paths(cfg)
    cfg = _prepare_out_dir(cfg, out_dir, resume)
    runtime = make_runtime(cfg)
    show = progress and runtime.is_main_process
    set_seed(cfg.seed)
    cache = cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    with runtime.main_process_first():
        data = load_splits(cfg.data, cfg.seed, cache)
    if runtime.is_main_process and not resume:
        _write_setup(out_dir, cfg, data)
    if cfg.mode != "train":
        return _evaluate_frozen(cfg, out_dir, backbone, data, runtime, cache, show, started)

    text_weight, stage1 = _stage1(cfg, out_dir, backbone, data.wheel, runtime, cache, resume)
    state, image_sets, sample_images = _prepare_training(cfg, out_dir, backbone, data, runtime, cache, text_weight,
                                                         show)
    text_only = clip_classifier(backbone.model, text_weight, 1.0, runtime)
    if cfg.train.supervision == "pseudo":
        state.pseudo = _teacher_labels(text_only, data, backbone, cfg, runtime, show)
    if resume:
        state.load()
        text_only_metrics = stage1.pop("text_only")
    else:
        text_only_metrics = {s: {k: evaluate_classifier(text_only, image_sets[s], cfg.data, data.wheel, runtime, show,
                                                        f"text-only {s}")[k] for k in HEADLINE}
                             for s in ("val", "test")}
        if runtime.is_main_process:
            with writing(out_dir):
                save_checkpoint(out_dir / "text_classifier.safetensors", {"weight": text_weight}, backbone.identity)
                write_json(out_dir / "checkpoints" / "stage1.json", {**stage1, "text_only": text_only_metrics})
        state.save()
    state.rewrite_log()
    with _stop_requests() as stop:
        fit(state, stop)
    return _finish(state, data, stage1, text_only_metrics, sample_images, started, resume)


def _resolve_paths(cfg: Config) -> None:
    """Make file paths absolute so the saved config re-creates the run from any directory."""
    for obj, key in ((cfg.backbone, "pretrained"), (cfg.data, "root"), (cfg.text, "descriptions"), (cfg, "cache_dir"),
                     (cfg.data, "splits_dir"), (cfg.data, "wheel_file")):
        value = getattr(obj, key)
        if value is not None and Path(value).expanduser().exists():
            setattr(obj, key, str(Path(value).expanduser().resolve()))


def _prepare_out_dir(cfg: Config, out_dir: Path, resume: bool) -> Config:
    """A new run needs a fresh folder; a resumed one takes its saved config (and must agree with
    the one given, if any)."""
    has_state = (out_dir / "checkpoints" / "latest.json").is_file()
    if not resume:
        if has_state or (out_dir / "summary.json").is_file():
            raise RunError(f"{out_dir} already holds a run; continue it with --resume, or choose another --out")
        return cfg
    if not has_state:
        raise RunError(f"{out_dir}: nothing to resume (no checkpoints/latest.json); start it without --resume")
    saved = load_config([out_dir / "config.yaml"])
    given, kept = OmegaConf.create(to_dict(cfg)), OmegaConf.create(to_dict(saved))
    differs = sorted(k for k in _flat_keys(kept) if OmegaConf.select(given, k) != OmegaConf.select(kept, k))
    if differs and given != OmegaConf.create(to_dict(Config())):
        raise RunError(f"--resume with a config that differs from the run's in {differs[:6]}; resume with the "
                       "run's own config (omit -c and overrides)")
    return saved


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, name + ".") if OmegaConf.is_dict(value) else [name]
    return keys


def _write_setup(out_dir: Path, cfg: Config, data: DatasetSplits) -> None:
    """The resolved config and the split lists: enough to re-create the run."""
    with writing(out_dir):
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        for split in SPLITS:
            write_manifest(out_dir / "splits" / f"{split}.csv", data[split], data.wheel, split)


def _stage1(cfg: Config, out_dir: Path, backbone: Backbone, wheel: Wheel, runtime: Runtime, cache: Path,
            resume: bool) -> tuple[torch.Tensor, dict]:
    """The text classifier: trained (stage 1), or read back from the run being resumed."""
    if resume:
        weight = load_checkpoint(out_dir / "text_classifier.safetensors", backbone.identity)["weight"]
        return weight, json.loads((out_dir / "checkpoints" / "stage1.json").read_text(encoding="utf-8"))
    with runtime.main_process_first():
        return train_stage1(backbone, wheel, cfg.text, cfg.seed, cache, runtime.device)


def _prepare_training(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, runtime: Runtime,
                      cache: Path, text_weight: torch.Tensor, show: bool) -> tuple[TrainState, dict, torch.Tensor]:
    """The model (its classifier from stage 1), datasets (cached features where the tower is
    fixed), loaders, optimizer and schedule, prepared for the runtime's processes. Also returns
    the plain image datasets and a batch of test images for the efficiency numbers."""
    wheel = data.wheel
    model = build_run_model(backbone, wheel, cfg, cache, runtime.device, text_weight)
    groups = param_groups(model)
    saved_names = saved_parameter_names(model, cfg)
    # Everything any phase tunes requires grad while the model is wrapped (DDP registers those).
    set_trainable(model, groups, tuned_groups(cfg.train))
    pseudo = cfg.train.supervision == "pseudo"
    views = {"train": strong_view(backbone.preprocess_cfg.size, backbone.preprocess_cfg.mean,
                                  backbone.preprocess_cfg.std)} if pseudo else {}
    if cfg.data.train_augment == "crop_flip":
        views["train"] = crop_flip_transform(backbone.preprocess_cfg)
    image_sets = {split: make_dataset(data[split], wheel, views.get(split, backbone.preprocess), cfg.data)
                  for split in SPLITS}
    sample_images = torch.stack([image_sets["test"][i]["image"] for i in range(min(8, len(image_sets["test"])))])
    datasets, from_features, inputs = dict(image_sets), cache_applies(cfg), None
    if from_features:
        model.to(runtime.device)
        with runtime.main_process_first():
            datasets = cached_datasets(model, datasets, wheel, backbone.preprocess, backbone.identity,
                                       backbone.preprocess_cfg, cache, cfg.data.eval_batch_size, runtime.device, show)
    elif cfg.data.image_store:  # pseudo-labels' strong view stays on the JPEG path
        with runtime.main_process_first():
            datasets, inputs = stored_datasets(image_sets, backbone.preprocess_cfg, cfg.data, cache,
                                               ("train",) if pseudo else (), show)
    runtime.lower_frozen(model, [p for g in tuned_groups(cfg.train) for p in groups[g].values()])
    loaders = {split: make_loader(datasets[split], cfg.data.batch_size if split == "train" else cfg.data.eval_batch_size,
                                  shuffle=split == "train", seed=cfg.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=runtime.device.type == "cuda")
               for split in SPLITS}
    optimizer = build_optimizer(groups, cfg)
    steps_per_epoch = len(loaders["train"])
    total_epochs = sum(p.epochs for p in cfg.train.phases)
    scheduler = warmup_cosine(optimizer, round(cfg.train.warmup_epochs * steps_per_epoch), total_epochs * steps_per_epoch)
    train_sampler = loaders["train"].sampler
    prepared, optimizer, scheduler, *split_loaders = runtime.prepare(model, optimizer, scheduler,
                                                                     *(loaders[s] for s in SPLITS))
    steps = torch.compile(prepared, backend=cfg.train.compile) if cfg.train.compile else prepared
    state = TrainState(cfg, out_dir, runtime, steps, runtime.unwrap_model(prepared), groups, saved_names,
                       optimizer, scheduler, dict(zip(SPLITS, split_loaders)), train_sampler,
                       [s.path for s in data["train"]], wheel, backbone.identity, from_features, None, show,
                       inputs=inputs)
    return state, image_sets, sample_images


def _teacher_labels(text_only: Classify, data: DatasetSplits, backbone: Backbone, cfg: Config, runtime: Runtime,
                    show: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LaFTer's pseudo-labels: the frozen stage-1 classifier on plain CLIP features of the weak
    (evaluation) view. Both are fixed, so each image's label is computed once for the whole run."""
    weak = make_dataset(data["train"], data.wheel, backbone.preprocess, cfg.data)
    logits = predict(text_only, eval_loader(weak, cfg.data, runtime), runtime, desc="pseudo-labels",
                     progress=show).logits
    confidence, labels = torch.softmax(torch.from_numpy(logits), dim=-1).max(dim=-1)
    return labels, confidence >= cfg.train.pseudo_threshold


@contextmanager
def _stop_requests() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (main thread only)."""
    flag: dict = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["signum"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _finish(state: TrainState, data: DatasetSplits, stage1: dict, text_only_metrics: dict,
            sample_images: torch.Tensor, started: float, resume: bool) -> dict:
    """Test the last and the selected (best on val) weights; write the summary, predictions, plots."""
    state.save_weights("last.safetensors")
    test_last, _ = state.evaluate("test")
    state.runtime.wait_for_everyone()
    load_weights(state.plain, state.out_dir / "model.safetensors", state.identity)
    test, preds = state.evaluate("test")
    p, cfg, out_dir = state.progress, state.cfg, state.out_dir
    counts = {g: sum(param.numel() for param in params.values()) for g, params in state.groups.items()}
    summary = {
        "val": p.best_val, "test": test, "test_last": test_last, "text_only": text_only_metrics,
        "best_epoch": p.best_epoch, "epochs": len(state.epochs), "stage1": stage1,
        "parameters": {"trainable": sum(counts[g] for g in tuned_groups(cfg.train)),
                       "added": sum(n for g, n in counts.items() if g not in ("layernorms", "backbone")),
                       "by_group": counts},
        "num_samples": {s: len(data[s]) for s in SPLITS},
        "skipped": data.skipped_summary(),
        "nonfinite_batches_skipped": p.skipped_batches,
    }
    if state.main:
        _write_run_files(out_dir, cfg, data.wheel, state.identity, summary, started, resume=resume,
                         extraction_layers=state.plain.extraction_layers,
                         efficiency=efficiency(lambda x: state.classify(x, images=True),
                                                    sample_images.to(state.runtime.device)))
        with writing(out_dir):
            _write_predictions(out_dir / "predictions.csv", preds, data["test"], data.wheel)
            plot_curves(p.records, out_dir / "plots" / "curves.png")
            plot_confusion(test["confusion_matrix"], data.wheel.classes, out_dir / "plots" / "confusion.png")
            plot_stage_weights(p.records, out_dir / "plots" / "stage_weights.png",
                               layer_names=[[f"L{layer}" for layer in stage] for stage in state.plain.stages])
    return summary


def _write_run_files(out_dir: Path, cfg: Config, wheel: Wheel, identity: dict, summary: dict, started: float,
                     **extra: Any) -> None:
    """``summary.json`` holds what the run computed (reproducible to the bit on CPU); ``run.json``
    what describes it, timings included (latency, wall time), which vary between machines."""
    with writing(out_dir):
        write_json(out_dir / "run.json", {"classes": list(wheel.classes), "label_space": wheel.name,
                                          "wheel": dataclasses.asdict(wheel), "backbone": identity,
                                          "mode": cfg.mode, "method": cfg.model.method, **extra,
                                          "hclafter_version": __version__, "torch_version": torch.__version__,
                                          "wall_time_s": time.time() - started})
        write_json(out_dir / "summary.json", summary)


def _write_predictions(path: Path, preds: Predictions, samples: Sequence, wheel: Wheel) -> None:
    probs = preds.probabilities
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prediction", *[f"p_{c}" for c in wheel.classes]])
        for i, idx in enumerate(preds.indices):
            writer.writerow([samples[idx].path, wheel.classes[preds.labels[i]], wheel.classes[probs[i].argmax()],
                             *[f"{p:.6f}" for p in probs[i]]])


def frozen_classifier(cfg: Config, backbone: Backbone, wheel: Wheel, runtime: Runtime,
                      cache: Path) -> tuple[Classify, Optional[dict]]:
    """The baselines without image training, on plain CLIP image features: zero-shot CLIP
    (``mode=zeroshot``: template embeddings at CLIP's own temperature) or the stage-1 text
    classifier (``mode=textonly``); with the stage-1 summary for the latter."""
    if cfg.mode == "zeroshot":
        weight = zeroshot_weights(backbone, wheel, load_templates(wheel, cfg.text.templates), cache, runtime.device)
        scale, stage1 = backbone.model.logit_scale.exp().item(), None
    else:
        weight, stage1 = train_stage1(backbone, wheel, cfg.text, cfg.seed, cache, runtime.device)
        scale = 1.0
    model = runtime.prepare_model(backbone.model, evaluation_mode=True).eval()
    runtime.lower_frozen(backbone.model)
    return clip_classifier(model, weight, scale, runtime), stage1


def _evaluate_frozen(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, runtime: Runtime,
                     cache: Path, show: bool, started: float) -> dict:
    """A zero-shot or text-only run: val and test metrics, no training."""
    wheel = data.wheel
    classify, stage1 = frozen_classifier(cfg, backbone, wheel, runtime, cache)
    results = {split: evaluate_classifier(classify, make_dataset(data[split], wheel, backbone.preprocess, cfg.data),
                                          cfg.data, wheel, runtime, show, f"eval {split}") for split in ("val", "test")}
    images = torch.stack([make_dataset(data["test"][:8], wheel, backbone.preprocess, cfg.data)[i]["image"]
                          for i in range(min(8, len(data["test"])))]).to(runtime.device)
    summary = {"val": results["val"], "test": results["test"], "stage1": stage1, "epochs": 0,
               "parameters": {"trainable": 0, "added": 0, "by_group": {}},
               "num_samples": {s: len(data[s]) for s in SPLITS}, "skipped": data.skipped_summary()}
    if runtime.is_main_process:
        _write_run_files(out_dir, cfg, wheel, backbone.identity, summary, started,
                         efficiency=efficiency(classify, images))
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
