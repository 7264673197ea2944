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
import io
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from ..core.checkpoint import (config_differences, load_checkpoint, load_weights, run_fingerprint, save_checkpoint,
                               saved_fingerprint)
from ..core.config import Config, load_config, to_dict, tuned_groups
from ..core.emotions import Wheel
from ..core.files import RunError, atomic_write_text, read_json, run_lock, write_json, writing
from ..core.metrics import HEADLINE
from ..core.progress import interactive
from ..core.runtime import Runtime, cache_dir_of, make_runtime
from ..data import SPLITS, DatasetSplits, eval_loader, load_splits, make_dataset, make_loader
from ..data.loading import cache_applies, cached_datasets
from ..data.splits import load_run_splits, save_run_splits
from ..data.store import crop_flip_transform, stored_datasets
from ..models.backbone import Backbone, backbone_from_config
from ..models.text import load_templates, train_stage1, zeroshot_weights
from ..reporting.report import write_run_figures
from ..version import __version__
from . import tracking
from .evaluation import (Classify, Predictions, clip_classifier, compute_metrics, efficiency, evaluate_classifier,
                         predict)
from .inference import build_run_model, load_run
from .training import (TrainingInterrupted, TrainState, build_optimizer, fit, param_groups,
                       saved_parameter_names, set_trainable, strong_view, trained_parameters, warmup_cosine)

__all__ = ["RunError", "TrainingInterrupted", "train_run", "zeroshot_eval"]


def train_run(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Stage 1 + stage 2 on the configured data (or a frozen baseline, by ``cfg.mode``); writes the
    run directory and returns the summary. The directory is locked while the run writes it: a
    second process that tries fails at once (RunError naming the holder)."""
    out_dir = Path(out_dir)
    if resume and not out_dir.is_dir():
        raise RunError(f"{out_dir}: nothing to resume (no such directory); start it without --resume")
    # One process of a multi-process run holds the lock; the others follow it.
    with run_lock(out_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        return _train_run(cfg, out_dir, progress, resume)


def _train_run(cfg: Config, out_dir: Path, progress: bool, resume: bool) -> dict:
    started = time.time()
    resolve_paths(cfg)
    cfg = _prepare_out_dir(cfg, out_dir, resume)
    runtime = make_runtime(cfg, tracking.tracker_names(cfg), tracking.logs_dir(out_dir))
    show = progress and runtime.is_main_process
    set_seed(cfg.seed)
    cache = cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    with runtime.main_process_first():
        if runtime.is_main_process and not resume:
            _write_setup(out_dir, cfg, load_splits(cfg.data, cfg.seed, cache))
        # Every run, new or resumed, trains on its saved lists (the same numbers either way).
        data = load_run_splits(out_dir / "splits", cfg.data, cache)
    if cfg.mode != "train":
        return _evaluate_frozen(cfg, out_dir, backbone, data, runtime, cache, show, started)

    text_weight, stage1 = _stage1(cfg, out_dir, backbone, data.wheel, runtime, cache, resume)
    state, image_sets, sample_images = _prepare_training(cfg, out_dir, backbone, data, runtime, cache, text_weight,
                                                         show)
    state.fingerprint = run_fingerprint(to_dict(cfg), out_dir / "splits")
    text_only = clip_classifier(backbone.model, text_weight, 1.0, runtime)
    if cfg.train.supervision == "pseudo":
        state.pseudo = _teacher_labels(text_only, data, backbone, cfg, runtime, show)
    if cfg.train.distill.teacher not in (None, "fused"):
        state.teacher = _teacher_run_logits(Path(cfg.train.distill.teacher), data, out_dir, show)
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
        # Training's random stream starts from the seed, whatever the set-up drew: building a cache
        # on first use iterates loaders that a run finding the cache warm does not.
        set_seed(cfg.seed)
        state.save()
    state.rewrite_log()
    tracking.start(runtime, cfg, out_dir)
    try:
        with _stop_requests() as stop:
            fit(state, stop)
        return _finish(state, data, stage1, text_only_metrics, sample_images, started, resume)
    finally:
        tracking.finish(runtime)


def resolve_paths(cfg: Config) -> None:
    """Make file paths absolute so the saved config re-creates the run from any directory."""
    for obj, key in ((cfg.backbone, "pretrained"), (cfg.data, "root"), (cfg.text, "descriptions"), (cfg, "cache_dir"),
                     (cfg.data, "splits_dir"), (cfg.data, "wheel_file")):
        value = getattr(obj, key)
        if value is not None and Path(value).expanduser().exists():
            setattr(obj, key, str(Path(value).expanduser().resolve()))


def _prepare_out_dir(cfg: Config, out_dir: Path, resume: bool) -> Config:
    """A new run needs a fresh folder; a resumed one takes its saved config, which must be the one
    its checkpoint was trained with (and agree with the one given)."""
    has_state = (out_dir / "checkpoints" / "latest.json").is_file()
    if not resume:
        if (out_dir / "summary.json").is_file():
            raise RunError(f"{out_dir} already holds a finished run; choose another --out (or delete that folder "
                           "to train it again)")
        if has_state:
            raise RunError(f"{out_dir} already holds an interrupted run; continue it with --resume, or choose "
                           "another --out")
        return cfg
    if not has_state:
        raise RunError(f"{out_dir}: nothing to resume (no checkpoints/latest.json); start it without --resume")
    saved = load_config([out_dir / "config.yaml"])
    _check_unchanged_since_checkpoint(out_dir, saved)
    differs = config_differences(to_dict(saved), to_dict(cfg))
    if differs:
        raise RunError(f"--resume with settings that differ from the run's ({_listed(differs)}); resume with the "
                       "run's own config (omit -c and those overrides), or train a new run into another --out")
    return saved


def _check_unchanged_since_checkpoint(out_dir: Path, saved: Config) -> None:
    """The run's config.yaml and split lists must be those its last checkpoint was saved with:
    another ``data.root`` or edited splits would continue the run on other data, silently."""
    fingerprint = saved_fingerprint(out_dir / "checkpoints")
    if fingerprint is None:
        return  # a state saved before checkpoints carried fingerprints
    changed = config_differences(fingerprint["config"], to_dict(saved))
    if changed:
        raise RunError(f"{out_dir / 'config.yaml'} was changed after the run's last checkpoint ({_listed(changed)}); "
                       "the saved state belongs to the settings it was trained with: restore them, or train a new "
                       "run into another --out")
    now = run_fingerprint(fingerprint["config"], out_dir / "splits")["splits"]
    differ = sorted(n for n in set(fingerprint["splits"]) | set(now) if fingerprint["splits"].get(n) != now.get(n))
    if differ:
        raise RunError(f"{out_dir / 'splits'}: {', '.join(differ)} changed or went missing after the run's last "
                       "checkpoint; a run continues on the splits it started with: restore them from a backup, or "
                       "train a new run into another --out")


def _listed(differences: list[str], most: int = 8) -> str:
    return "; ".join(differences[:most]) + (f"; and {len(differences) - most} more" if len(differences) > most else "")


def saved_run_config(out_dir: Path) -> dict:
    """The settings a run was made with: those its last checkpoint or its run.json stores, else
    its config.yaml (runs from before they were stored)."""
    if (out_dir / "checkpoints" / "latest.json").is_file():
        fingerprint = saved_fingerprint(out_dir / "checkpoints")
        if fingerprint is not None:
            return fingerprint["config"]
    if (out_dir / "run.json").is_file():
        info = read_json(out_dir / "run.json")
        if isinstance(info, dict) and "config" in info:
            return info["config"]
    return to_dict(load_config([out_dir / "config.yaml"]))


def _write_setup(out_dir: Path, cfg: Config, data: DatasetSplits) -> None:
    """The resolved config and the split lists: enough to re-create the run."""
    with writing(out_dir):
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        save_run_splits(out_dir / "splits", data)


def _stage1(cfg: Config, out_dir: Path, backbone: Backbone, wheel: Wheel, runtime: Runtime, cache: Path,
            resume: bool) -> tuple[torch.Tensor, dict]:
    """The text classifier: trained (stage 1), or read back from the run being resumed."""
    if resume:
        weight = load_checkpoint(out_dir / "text_classifier.safetensors", backbone.identity)["weight"]
        return weight, read_json(out_dir / "checkpoints" / "stage1.json")
    with runtime.main_process_first():
        return train_stage1(backbone, wheel, cfg.text, cfg.seed, cache, runtime.device)


def _prepare_training(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, runtime: Runtime,
                      cache: Path, text_weight: torch.Tensor, show: bool) -> tuple[TrainState, dict, torch.Tensor]:
    """The model (its classifier from stage 1), datasets (cached features where the tower is
    fixed), loaders, optimizer and schedule, prepared for the runtime's processes. Also returns
    the plain image datasets and a batch of test images for the efficiency numbers."""
    wheel = data.wheel
    model = build_run_model(backbone, wheel, cfg, text_weight)
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
                                       backbone.preprocess_cfg, cache, cfg.data.eval_batch_size, runtime.device,
                                       show and interactive())
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


def _teacher_run_logits(teacher_dir: Path, data: DatasetSplits, out_dir: Path, show: bool) -> torch.Tensor:
    """A finished run's fused logits on this run's training images ([N, C], columns in this run's
    class order, matched by name), computed once and kept in ``teacher_logits.safetensors``."""
    path = out_dir / "teacher_logits.safetensors"
    if path.is_file():
        return load_checkpoint(path)["logits"]
    teacher = load_run(teacher_dir)
    if sorted(teacher.wheel.classes) != sorted(data.wheel.classes):
        raise RunError(f"train.distill.teacher: {teacher_dir} predicts {list(teacher.wheel.classes)}, this run "
                       f"has {list(data.wheel.classes)}; a teacher must share the class names")

    def classify(images: torch.Tensor):
        with teacher.runtime.autocast():
            return teacher.model.forward_stages(images).logits, None

    dataset = make_dataset(data["train"], data.wheel, teacher.backbone.preprocess, teacher.cfg.data)
    logits = predict(classify, eval_loader(dataset, teacher.cfg.data, teacher.runtime), teacher.runtime,
                     desc="teacher", progress=show).logits
    order = [teacher.wheel.classes.index(c) for c in data.wheel.classes]
    logits = torch.from_numpy(logits[:, order]).float()
    with writing(path):
        save_checkpoint(path, {"logits": logits})
    return logits


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
    """Test the last and the selected (best on val) weights; write the predictions, the plots and, last,
    the summary (the mark of a finished run: a kill before it leaves a run that --resume finishes)."""
    state.save_weights("last.safetensors")
    test_last, _ = state.evaluate("test")
    state.runtime.wait_for_everyone()
    load_weights(state.plain, state.out_dir / "model.safetensors", state.identity)
    _, val_preds = state.evaluate("val")
    test, preds = state.evaluate("test")
    _, val_preds = state.evaluate("val")
    p, cfg, out_dir = state.progress, state.cfg, state.out_dir
    summary = {
        "val": p.best_val, "test": test, "test_last": test_last, "text_only": text_only_metrics,
        "best_epoch": p.best_epoch, "epochs": len(state.epochs), "stage1": stage1,
        "parameters": trained_parameters(state.plain, state.groups, cfg),
        "num_samples": {s: len(data[s]) for s in SPLITS},
        "absent_classes": data.absent_classes(),
        "skipped": data.skipped_summary(),
        "nonfinite_batches_skipped": p.skipped_batches,
    }
    weights = _image_fusion_weights(state, data.wheel)
    if weights is not None:
        summary["image_fusion_weights"] = weights
    if state.main:
        _write_run_info(out_dir, cfg, data.wheel, state.identity, started, resume=resume,
                        extraction_layers=state.plain.extraction_layers, stages=state.plain.stages,
                        hardware=tracking.hardware(state.runtime),
                        efficiency=efficiency(lambda x: state.classify(x, images=True),
                                              sample_images.to(state.runtime.device)))
        with writing(out_dir):
            _write_predictions(out_dir / "predictions.csv", preds, data["test"], data.wheel)
            _write_predictions(out_dir / "predictions_val.csv", val_preds, data["val"], data.wheel)
            figures = write_run_figures(out_dir, summary)
            tracking.log_figures(state.runtime, figures, p.global_step)
            write_json(out_dir / "summary.json", summary)  # last: it marks the run as finished
    return summary


@torch.no_grad()
def _image_fusion_weights(state: TrainState, wheel: Wheel) -> Optional[dict]:
    """Input-adaptive fusion: the per-image stage weights on the test split, their mean and spread
    overall and their mean per true class; None for fusion weights that do not depend on the image."""
    weights, labels = [], []
    state.plain.eval()
    for batch in state.loaders["test"]:
        inputs = batch["image"].to(state.runtime.device)
        if state.inputs is not None:  # image-store rows → model inputs
            inputs = state.inputs(inputs, train=False)
        with state.runtime.autocast():
            out = state.plain(inputs, return_stages=True, from_features=state.from_features)
        if out.fusion_weights is None:
            return None
        weights.append(state.runtime.gather_for_metrics(out.fusion_weights.float()).cpu())
        labels.append(state.runtime.gather_for_metrics(batch["label"].to(state.runtime.device)).cpu())
    w, y = torch.cat(weights), torch.cat(labels)
    return {"mean": w.mean(0).tolist(), "std": w.std(0).tolist(),
            "per_class": {c: w[y == i].mean(0).tolist() for i, c in enumerate(wheel.classes) if (y == i).any()}}


def _write_run_info(out_dir: Path, cfg: Config, wheel: Wheel, identity: dict, started: float, **extra: Any) -> None:
    """``run.json``: what describes the run, timings included (latency, wall time), which vary
    between machines, and the config and split lists it was made with (:func:`verify_run_files`
    checks them on loading). ``summary.json`` holds what the run computed (reproducible to the bit
    on CPU) and is written last."""
    record = run_fingerprint(to_dict(cfg), out_dir / "splits")
    with writing(out_dir):
        write_json(out_dir / "run.json", {"classes": list(wheel.classes), "label_space": wheel.name,
                                          "wheel": dataclasses.asdict(wheel), "backbone": identity,
                                          "mode": cfg.mode, "method": cfg.model.method, **extra,
                                          "hclafter_version": __version__, "torch_version": torch.__version__,
                                          "wall_time_s": time.time() - started, "config": record["config"],
                                          "splits_sha256": record["splits"]})


def _write_predictions(path: Path, preds: Predictions, samples: Sequence, wheel: Wheel) -> None:
    """One row per image, so that every metric can be recomputed from the file: ``path, label,
    prediction``, the fused probabilities ``p_<class>``, the target distribution ``t_<class>``, each
    stage's probabilities ``s<k>_<class>`` (k = 1..S) and the fused logits ``z_<class>`` (unrounded:
    temperature scaling is fitted on them)."""
    probs = preds.probabilities
    stages = [] if preds.stage_probabilities is None else list(preds.stage_probabilities)
    classes = wheel.classes
    header = ["path", "label", "prediction", *[f"p_{c}" for c in classes], *[f"t_{c}" for c in classes],
              *[f"s{k}_{c}" for k in range(1, len(stages) + 1) for c in classes], *[f"z_{c}" for c in classes]]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for i, idx in enumerate(preds.indices):
        writer.writerow([samples[idx].path, classes[preds.labels[i]], classes[probs[i].argmax()],
                         *[f"{p:.6f}" for p in probs[i]], *[f"{t:.6f}" for t in preds.distributions[i]],
                         *[f"{p:.6f}" for stage in stages for p in stage[i]],
                         *[format(float(z), ".9g") for z in preds.logits[i]]])
    atomic_write_text(path, text.getvalue())


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
            _write_predictions(out_dir / "predictions.csv", preds["test"], data["test"], wheel)
            _write_predictions(out_dir / "predictions_val.csv", preds["val"], data["val"], wheel)
        _write_run_info(out_dir, cfg, wheel, backbone.identity, started, hardware=tracking.hardware(runtime),
                        efficiency=efficiency(classify, images))
        with writing(out_dir):
            write_json(out_dir / "summary.json", summary)  # last: it marks the run as finished
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
