"""A run end to end: set-up → stage 1 → the stage-2 loop → finish, in a crash-safe run directory.

A run's resumable state (weights, optimizer, scheduler, epoch and step, every random stream) is
saved atomically at phase ends, on improvements, every ``train.state_every_s`` seconds (see ``loop.py``), in
``checkpoints/step-N/`` with ``checkpoints/latest.json`` pointing at the newest complete one;
``train_run(..., resume=True)`` continues from it and ends with the same summary as an
uninterrupted run. The baselines without a loop (zero-shot CLIP, the text-only classifier, the
methods fitted without gradient steps) are in ``frozen.py``; the loop is ``loop.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from accelerate.utils import set_seed

from ..core.checkpoint import (config_differences, content_hash, file_differences, load_checkpoint, load_weights,
                               run_fingerprint, save_checkpoint, saved_fingerprint)
from ..core.config import Config, to_dict, tuned_groups
from ..core.emotions import Wheel
from ..core.files import RunError, read_json, run_lock, write_json, writing
from ..core.integrity import rebuild_warning
from ..core.metrics import HEADLINE, convergence
from ..core.runtime import Runtime, cache_dir_of, make_runtime
from ..data import SPLITS, DatasetSplits, EmotionImages, Sample, eval_loader, load_splits, make_dataset, make_loader
from ..data.splits import load_run_splits, save_run_splits
from ..models import check_config, method_class
from ..models.backbone import Backbone, backbone_from_config
from ..models.text import train_stage1
from . import runfiles, tracking
from .evaluation import Classify, clip_classifier, efficiency, evaluate_classifier, predict
from .frozen import evaluate_frozen, fit_frozen
from .inference import build_run_model, load_run
from .inputs import training_inputs
from .loop import TrainingInterrupted, TrainState, fit
from .optim import (build_optimizer, param_groups, saved_parameter_names, schedule_length, set_trainable,
                    trained_parameters, warmup_cosine)

__all__ = ["Figures", "RunError", "TrainingInterrupted", "train_run"]

# Draws a finishing run's figures from its files and summary; returns the PNGs by name.
Figures = Callable[[Path, dict], dict[str, Path]]
# Called after every validation of the loop with (steps done, steps in all, validation metrics); may raise to
# stop the run.
OnValidation = Callable[[int, int, dict], None]


def train_run(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False,
              figures: Optional[Figures] = None, on_validation: Optional[OnValidation] = None,
              evaluate_test: bool = True) -> dict:
    """Stage 1 + stage 2 on the configured data (or a frozen baseline, by ``cfg.mode``); writes the
    run directory and returns the summary. ``figures`` draws the run's figures before its summary
    is written (the CLI passes ``reporting.report.write_run_figures``; without it ``hclafter report``
    draws them later). ``on_validation`` sees every validation as it happens (a tuner's pruner);
    ``evaluate_test=False`` never predicts the test split (a tuning trial: its summary has no
    ``test``, so nothing chosen from it can have read test labels). The directory is locked while
    the run writes it: a second process that tries fails at once (RunError naming the holder)."""
    check_config(cfg)
    out_dir = Path(out_dir)
    if resume and not out_dir.is_dir():
        raise RunError(f"{out_dir}: nothing to resume (no such directory); start it without --resume")
    # One process of a multi-process run holds the lock; the others follow it.
    with run_lock(out_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        return _train_run(cfg, out_dir, progress, resume, figures, on_validation, evaluate_test)


def _train_run(cfg: Config, out_dir: Path, progress: bool, resume: bool, figures: Optional[Figures],
               on_validation: Optional[OnValidation], evaluate_test: bool) -> dict:
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
            with writing(out_dir):
                runfiles.write_config(out_dir, cfg)
                save_run_splits(out_dir / "splits", load_splits(cfg.data, cfg.seed, cache))
        # Every run, new or resumed, trains on its saved lists (the same numbers either way).
        data = load_run_splits(out_dir / "splits", cfg.data, cache)
    if cfg.mode != "train":
        return evaluate_frozen(cfg, out_dir, backbone, data, runtime, cache, show, started, evaluate_test)
    if not method_class(cfg.model.method).trained_by_gradient:
        return fit_frozen(cfg, out_dir, backbone, data, runtime, cache, show, started, evaluate_test)

    text_weight, stage1 = _stage1(cfg, out_dir, backbone, data.wheel, runtime, cache, resume)
    state, images = _prepare_training(cfg, out_dir, backbone, data, runtime, cache, text_weight, show)
    state.on_validation = on_validation
    text_only = clip_classifier(backbone.model, text_weight, 1.0, runtime)
    if cfg.train.supervision == "pseudo":
        state.pseudo = _teacher_labels(text_only, data, backbone, cfg, runtime, show)
    if cfg.train.distill.teacher not in (None, "fused"):
        state.teacher = _teacher_run_logits(Path(cfg.train.distill.teacher), data, out_dir, show)
    if resume:
        state.load()
        text_only_metrics = stage1.pop("text_only")
    else:
        text_only_metrics = {split: _text_only_metrics(text_only, text_weight, images[split], data[split], cfg,
                                                       data.wheel, runtime, cache, show, split)
                             for split in (("val", "test") if evaluate_test else ("val",))}
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
        return _finish(state, data, stage1, text_only_metrics, images, started, resume, figures, evaluate_test)
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
        if runfiles.is_finished(out_dir):
            raise RunError(f"{out_dir} already holds a finished run; choose another --out (or delete that folder "
                           "to train it again)")
        if has_state:
            raise RunError(f"{out_dir} already holds an interrupted run; continue it with --resume, or choose "
                           "another --out")
        return cfg
    if not has_state:
        raise RunError(f"{out_dir}: nothing to resume (no checkpoints/latest.json); start it without --resume")
    fingerprint = saved_fingerprint(out_dir / "checkpoints")  # the state's files verified before anything is read
    saved = runfiles.read_config(out_dir)
    _check_unchanged_since_checkpoint(out_dir, saved, fingerprint)
    differs = config_differences(to_dict(saved), to_dict(cfg))
    if differs:
        raise RunError(f"--resume with settings that differ from the run's ({_listed(differs)}); resume with the "
                       "run's own config (omit -c and those overrides), or train a new run into another --out")
    return saved


def _check_unchanged_since_checkpoint(out_dir: Path, saved: Config, fingerprint: dict) -> None:
    """The run's config.yaml and split lists must be those its last checkpoint was saved with
    (``fingerprint``): another ``data.root`` or edited splits would continue the run on other data,
    silently."""
    changed = file_differences(fingerprint["config"], to_dict(saved))
    if changed:
        raise RunError(f"{out_dir / runfiles.CONFIG} was changed after the run's last checkpoint "
                       f"({_listed(changed)}); the saved state belongs to the settings it was trained with: restore "
                       "them, or train a new run into another --out")
    then = fingerprint["splits"]
    now = run_fingerprint(fingerprint["config"], out_dir / "splits")["splits"]
    differ = sorted(n for n in set(then) | set(now) if then.get(n) != now.get(n))
    if differ:
        raise RunError(f"{out_dir / 'splits'}: {', '.join(differ)} changed or went missing after the run's last "
                       "checkpoint; a run continues on the splits it started with: restore them from a backup, or "
                       "train a new run into another --out")


def _listed(differences: list[str], most: int = 8) -> str:
    return "; ".join(differences[:most]) + (f"; and {len(differences) - most} more" if len(differences) > most else "")


def _stage1(cfg: Config, out_dir: Path, backbone: Backbone, wheel: Wheel, runtime: Runtime, cache: Path,
            resume: bool) -> tuple[torch.Tensor, dict]:
    """The text classifier: trained (stage 1), or read back from the run being resumed."""
    if resume:
        weight = load_checkpoint(out_dir / "text_classifier.safetensors", backbone.identity)["weight"]
        return weight, read_json(out_dir / "checkpoints" / "stage1.json")
    with runtime.main_process_first():
        return train_stage1(backbone, wheel, cfg.text, cfg.seed, cache, runtime.device)


def _text_only_metrics(text_only: Classify, text_weight: torch.Tensor, images: EmotionImages, samples: Sequence[Sample],
                       cfg: Config, wheel: Wheel, runtime: Runtime, cache: Path, show: bool, split: str) -> dict:
    """The stage-1 classifier's headline metrics on a split, computed once for every run that shares
    the classifier, the images and how they are evaluated (the runs of a sweep's methods at one
    seed): kept in the cache, keyed by all of that and the torch thread count."""
    files = [(s.path, s.label, os.stat(s.path).st_size, os.stat(s.path).st_mtime_ns) for s in samples]
    blob = [content_hash({"weight": text_weight}), files, to_dict(cfg.data), runtime.precision, str(runtime.device),
            torch.get_num_threads()]
    key = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache / "text_only" / f"{key}.json"
    if path.is_file():
        try:
            saved = read_json(path)
            if isinstance(saved, dict) and saved.get("sha256") == _metrics_digest(saved.get("metrics")):
                return saved["metrics"]
            rebuild_warning(path, "text-only metrics fail verification (changed on disk)")
        except RunError as e:
            rebuild_warning(path, f"text-only metrics unreadable ({e})")
    metrics = evaluate_classifier(text_only, images, cfg.data, wheel, runtime, show, f"text-only {split}")
    headline = {k: metrics[k] for k in HEADLINE}
    if runtime.is_main_process:
        write_json(path, {"metrics": headline, "sha256": _metrics_digest(headline)})
    return headline


def _metrics_digest(metrics: object) -> str:
    """The sha256 of the metrics as canonical JSON: a byte changed in the file, which may still parse,
    is caught."""
    return hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()


def _prepare_training(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, runtime: Runtime,
                      cache: Path, text_weight: torch.Tensor, show: bool) -> tuple[TrainState, dict]:
    """The model (its classifier from stage 1), what the loaders read, the optimizer and schedule,
    prepared for the runtime's processes; also returns each split's images through its view."""
    model = build_run_model(backbone, data.wheel, cfg, text_weight)
    groups = param_groups(model)
    saved_names = saved_parameter_names(model, cfg)
    # Everything any phase tunes requires grad while the model is wrapped (DDP registers those).
    set_trainable(model, groups, tuned_groups(cfg.train))
    inputs = training_inputs(cfg, backbone, data, model, runtime, cache, show)
    val_features = inputs.features("val") if model.uses_split_features else None
    selection = model.fit(inputs.features("train"), val_features) if val_features is not None else {}
    runtime.lower_frozen(model, [p for g in tuned_groups(cfg.train) for p in groups[g].values()])
    loaders = {split: make_loader(inputs.datasets[split],
                                  cfg.data.batch_size if split == "train" else cfg.data.eval_batch_size,
                                  shuffle=split == "train", seed=cfg.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=runtime.device.type == "cuda")
               for split in SPLITS}
    optimizer = build_optimizer(groups, cfg)
    scheduler = warmup_cosine(optimizer, *schedule_length(cfg.train, len(loaders["train"]), runtime.num_processes))
    train_sampler = loaders["train"].sampler
    prepared, optimizer, scheduler, *split_loaders = runtime.prepare(model, optimizer, scheduler,
                                                                     *(loaders[s] for s in SPLITS))
    state = TrainState(cfg=cfg, out_dir=out_dir, runtime=runtime,
                       model=torch.compile(prepared, backend=cfg.train.compile) if cfg.train.compile else prepared,
                       plain=runtime.unwrap_model(prepared), groups=groups, saved_names=saved_names,
                       optimizer=optimizer, scheduler=scheduler, loaders=dict(zip(SPLITS, split_loaders)),
                       train_sampler=train_sampler, train_paths=[s.path for s in data["train"]], wheel=data.wheel,
                       identity=backbone.identity, fingerprint=run_fingerprint(to_dict(cfg), out_dir / "splits"),
                       from_features=inputs.from_features, view=inputs.view, selection=selection,
                       val_features=val_features, show=show)
    return state, inputs.images


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
    with writing(path, out_dir):
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


def _finish(state: TrainState, data: DatasetSplits, stage1: dict, text_only_metrics: dict, images: dict,
            started: float, resume: bool, figures: Optional[Figures], evaluate_test: bool) -> dict:
    """Test the selected (best on val) weights, and the last ones where they differ (unless
    ``evaluate_test`` is false); judge convergence from the validation curve; write the predictions,
    the figures and, last, the summary (the mark of a finished run: a kill before it leaves a run
    that --resume finishes)."""
    p, cfg, out_dir = state.progress, state.cfg, state.out_dir
    state.save_weights("last.safetensors")
    test_last = test = preds = None
    if evaluate_test and p.best_step != state.total_steps:  # else the selected weights are the last ones
        test_last, _ = state.evaluate("test")
    if p.best_step != state.total_steps:
        state.runtime.wait_for_everyone()
        load_weights(state.plain, out_dir / "model.safetensors", state.identity)
    if evaluate_test:
        test, preds = state.evaluate("test")
    # The selected weights' validation predictions are kept from their round, unless a resume lost them.
    val_preds = state.best_val_predictions
    if val_preds is None:
        val_preds = state.evaluate("val")[1]
    tested = {"test": test, "test_last": test if test_last is None else test_last} if evaluate_test else {}
    summary = {
        "val": p.best_val, **tested, "text_only": text_only_metrics,
        "best_epoch": p.best_epoch, "best_step": p.best_step, "epochs": state.epochs_of(state.total_steps),
        "steps": state.total_steps,
        "convergence": convergence([(r["step"], r["val_accuracy"]) for r in p.records], state.total_steps),
        "stage1": stage1,
        "parameters": trained_parameters(state.plain, state.groups, cfg),
        "num_samples": {s: len(data[s]) for s in SPLITS},
        "absent_classes": data.absent_classes(),
        "skipped": data.skipped_summary(),
        "nonfinite_batches_skipped": p.skipped_batches,
    }
    if p.best_selection:
        summary["selection"] = p.best_selection
    weights = _image_fusion_weights(state, data.wheel) if evaluate_test else None
    if weights is not None:
        summary["image_fusion_weights"] = weights
    if state.main:
        sample = torch.stack([images["test"][i]["image"] for i in range(min(8, len(images["test"])))])
        runfiles.write_info(out_dir, cfg, data.wheel, state.identity, started, resume=resume,
                            extraction_layers=state.plain.extraction_layers, stages=state.plain.stages,
                            hardware=tracking.hardware(state.runtime),
                            efficiency=efficiency(lambda x: state.classify(x, images=True),
                                                  sample.to(state.runtime.device)))
        with writing(out_dir, out_dir):
            if preds is not None:
                runfiles.write_predictions(out_dir, "test", preds, data["test"], data.wheel)
            runfiles.write_predictions(out_dir, "val", val_preds, data["val"], data.wheel)
            if figures is not None:
                tracking.log_figures(state.runtime, figures(out_dir, summary), p.global_step)
        runfiles.write_summary(out_dir, summary)
    return summary


@torch.no_grad()
def _image_fusion_weights(state: TrainState, wheel: Wheel) -> Optional[dict]:
    """Input-adaptive fusion: the per-image stage weights on the test split, their mean and spread
    overall and their mean per true class; None for fusion weights that do not depend on the image."""
    weights, labels = [], []
    state.plain.eval()
    for batch in state.loaders["test"]:
        inputs = batch["image"].to(state.runtime.device)
        if state.view is not None:  # image-store rows → model inputs
            inputs = state.view(inputs, train=False)
        with state.runtime.autocast():
            out = state.plain(inputs, return_stages=True, from_features=state.from_features)
        if out.fusion_weights is None:
            return None
        weights.append(state.runtime.gather_for_metrics(out.fusion_weights.float()).cpu())
        labels.append(state.runtime.gather_for_metrics(batch["label"].to(state.runtime.device)).cpu())
    w, y = torch.cat(weights), torch.cat(labels)
    return {"mean": w.mean(0).tolist(), "std": w.std(0).tolist(),
            "per_class": {c: w[y == i].mean(0).tolist() for i, c in enumerate(wheel.classes) if (y == i).any()}}
