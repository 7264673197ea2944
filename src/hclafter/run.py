"""A training run end to end, its run directory, and loading a finished run for inference.

A run is crash-safe: its resumable state (weights, optimizer, scheduler, epoch and step, every
random stream) is saved atomically after every epoch and every ``train.checkpoint_every_steps``
steps, in ``checkpoints/step-N/`` with ``checkpoints/latest.json`` pointing at the newest complete
one; ``train_run(..., resume=True)`` continues from it and ends with the same summary as an
uninterrupted run.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .backbone import Backbone, backbone_from_config
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint, write_json
from .config import Config, load_config, to_dict
from .data import SPLITS, DatasetSplits, load_split_files, load_splits, make_dataset, make_loader, write_manifest
from .emotions import Wheel
from .evaluation import Predictions, clip_classifier, compute_metrics, efficiency, predict
from .feature_cache import cache_applies, cached_datasets
from .images import ImageError, load_rgb, to_rgb
from .model import build_model
from .plots import plot_confusion, plot_curves, plot_stage_weights
from .text import (class_texts, encode_texts, load_descriptions, load_templates, train_text_classifier,
                   zeroshot_weights)
from .training import (SUM_KEYS, NonFiniteError, build_optimizer, epoch_stats, load_optimizer_state, optimizer_state,
                       param_groups, phase_of_epoch, rng_state, saved_parameter_names, set_rng_state, set_trainable,
                       strong_view, train_step, trained_groups, warmup_cosine)

SCALARS = ("accuracy", "macro_f1", "polarity_accuracy")


class RunError(RuntimeError):
    """A run directory is incomplete, belongs to another setup, or cannot be written."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def cache_dir_of(cfg: Config) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "hclafter"


def make_accelerator(cfg: Config) -> Accelerator:
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RunError("device: 'cuda' requested but no CUDA device is available; use device=auto or cpu")
    # accelerate keeps one state per process; a library call may ask for another precision than
    # the last one (a notebook, a sweep), so that state is renewed (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    # Phases switch groups on and off, so DDP must tolerate parameters without gradients.
    return Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _resolve_paths(cfg: Config) -> None:
    """Make file paths absolute so the saved config re-creates the run from any directory."""
    for obj, key in ((cfg.backbone, "pretrained"), (cfg.data, "root"), (cfg.text, "descriptions"), (cfg, "cache_dir"),
                     (cfg.data, "splits_dir"), (cfg.data, "wheel_file")):
        value = getattr(obj, key)
        if value is not None and Path(value).expanduser().exists():
            setattr(obj, key, str(Path(value).expanduser().resolve()))


@contextmanager
def _writing(what: Path) -> Iterator[None]:
    """Turn a failed write (disk full, quota, permissions) into a message that says what is safe."""
    try:
        yield
    except OSError as e:
        raise RunError(f"cannot write {what}: {e}. Files written earlier are intact (every write is atomic); "
                       "free space or fix permissions, then continue with --resume") from None


def _save_weights(model: torch.nn.Module, names: Sequence[str], path: Path, identity: dict) -> None:
    state = model.state_dict()
    with _writing(path):
        save_checkpoint(path, {n: state[n].float() for n in names}, identity)


def load_weights(model: torch.nn.Module, path: Path, identity: Optional[dict] = None) -> None:
    """Load a run's weights, verifying content hash and backbone identity, and every name and shape."""
    try:
        saved = load_checkpoint(path, identity)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    own = model.state_dict()
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise RunError(f"{path}: parameters {unknown[:5]} do not exist in the model built from the run's config")
    for name, tensor in saved.items():
        if tensor.shape != own[name].shape:
            raise RunError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
    model.load_state_dict(saved, strict=False)


def _text_classifier(backbone: Backbone, wheel: Wheel, cfg: Config, cache: Path,
                     device: torch.device) -> tuple[torch.Tensor, dict]:
    """Stage 1: encode descriptions + templates, train U on them."""
    texts, labels = class_texts(wheel, load_descriptions(wheel, cfg.text.descriptions),
                                load_templates(wheel, cfg.text.templates), backbone.tokenizer,
                                cfg.text.descriptions or f"shipped {wheel.name} descriptions")
    features = encode_texts(backbone, texts, cache, cfg.text.batch_size, device)
    weight, history = train_text_classifier(features, torch.tensor(labels), wheel.num_classes, cfg.text, cfg.seed)
    return weight, {"texts": len(texts), "steps": cfg.text.steps, "final_loss": history[-1] if history else None}


def build_run_model(backbone: Backbone, wheel: Wheel, cfg: Config, cache: Path, device: torch.device,
                    text_weight: Optional[torch.Tensor] = None) -> torch.nn.Module:
    """The configured method's model; a shared classifier starts from the stage-1 weights."""
    class_embeddings = None
    if cfg.model.method == "cascadeclip":
        class_embeddings = zeroshot_weights(backbone, wheel, load_templates(wheel, cfg.text.templates), cache, device)
    model = build_model(backbone, wheel.num_classes, cfg.model, class_embeddings=class_embeddings)
    if text_weight is not None and hasattr(model, "classifier"):
        with torch.no_grad():
            model.classifier.linear.weight.copy_(text_weight)
    return model


def _summary_scalars(metrics: dict, prefix: str) -> dict:
    out = {f"{prefix}_{k}": metrics[k] for k in SCALARS}
    out[f"{prefix}_kl"] = metrics["ldl"]["kl"]
    return out


def _write_predictions(path: Path, preds: Predictions, samples: Sequence, wheel: Wheel) -> None:
    probs = preds.probabilities
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prediction", *[f"p_{c}" for c in wheel.classes]])
        for i, idx in enumerate(preds.indices):
            writer.writerow([samples[idx].path, wheel.classes[preds.labels[i]], wheel.classes[probs[i].argmax()],
                             *[f"{p:.6f}" for p in probs[i]]])


@dataclass
class Progress:
    """Where training stands; with the tensors it is everything a resumed run needs."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimisation steps done in the current epoch
    global_step: int = 0
    sums: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))
    skipped_batches: list = dataclasses.field(default_factory=list)
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_val: Optional[dict] = None
    records: list = dataclasses.field(default_factory=list)


def _save_state(out_dir: Path, model: torch.nn.Module, names: Sequence[str], optimizer, scheduler,
                progress: Progress, identity: dict) -> None:
    """Write a complete state folder, then point ``latest.json`` at it; older folders are removed."""
    folder = out_dir / "checkpoints" / f"step-{progress.global_step:08d}"
    state = model.state_dict()
    opt_tensors, opt_groups = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()
    with _writing(folder):
        if folder.exists():
            shutil.rmtree(folder)
        hashes = {"weights": save_checkpoint(folder / "weights.safetensors", {n: state[n] for n in names}, identity),
                  "optimizer": save_checkpoint(folder / "optimizer.safetensors", {**opt_tensors, **rng_tensors}, identity)}
        write_json(folder / "state.json", {"progress": dataclasses.asdict(progress), "optimizer_groups": opt_groups,
                                           "scheduler": scheduler.state_dict(), "rng": rng_json, "sha256": hashes})
        write_json(out_dir / "checkpoints" / "latest.json", {"folder": folder.name, "sha256": hashes})
    for old in (out_dir / "checkpoints").glob("step-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(out_dir: Path, model: torch.nn.Module, optimizer, scheduler, identity: dict) -> Progress:
    latest = out_dir / "checkpoints" / "latest.json"
    try:
        pointer = json.loads(latest.read_text(encoding="utf-8"))
        folder = out_dir / "checkpoints" / pointer["folder"]
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        weights = load_checkpoint(folder / "weights.safetensors", identity)
        opt = load_checkpoint(folder / "optimizer.safetensors", identity)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        raise RunError(f"{out_dir}: cannot resume, the saved state is unreadable ({e})") from None
    model.load_state_dict(weights, strict=False)
    load_optimizer_state(optimizer, {k: v for k, v in opt.items() if not k.startswith("rng.")},
                         state["optimizer_groups"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state({k: v for k, v in opt.items() if k.startswith("rng.")}, state["rng"])
    return Progress(**state["progress"])


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


def _flat_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, name + ".") if OmegaConf.is_dict(value) else [name]
    return keys


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


def _write_run_files(out_dir: Path, cfg: Config, wheel: Wheel, identity: dict, summary: dict, started: float,
                     **extra: Any) -> None:
    """``summary.json`` holds what the run computed (reproducible to the bit on CPU); ``run.json``
    what describes it, timings included (latency, wall time), which vary between machines."""
    with _writing(out_dir):
        write_json(out_dir / "run.json", {"classes": list(wheel.classes), "label_space": wheel.name,
                                          "wheel": dataclasses.asdict(wheel), "backbone": identity,
                                          "mode": cfg.mode, "method": cfg.model.method, **extra,
                                          "hclafter_version": __version__, "torch_version": torch.__version__,
                                          "wall_time_s": time.time() - started})
        write_json(out_dir / "summary.json", summary)


def _teacher_labels(text_only, samples: Sequence, wheel: Wheel, backbone: Backbone, cfg: Config,
                    accelerator: Accelerator, show: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LaFTer's pseudo-labels: the frozen stage-1 classifier on plain CLIP features of the weak
    (evaluation) view. Both are fixed, so each image's label is computed once for the whole run."""
    weak = make_dataset(samples, wheel, backbone.preprocess, cfg.data)
    loader = accelerator.prepare_data_loader(make_loader(weak, cfg.data.eval_batch_size, False, cfg.seed,
                                                         cfg.data.num_workers))
    probs = torch.softmax(torch.from_numpy(predict(text_only, loader, accelerator, desc="pseudo-labels",
                                                   progress=show).logits), dim=-1)
    confidence, labels = probs.max(dim=-1)
    return labels, confidence >= cfg.train.pseudo_threshold


def _evaluate_frozen(cfg: Config, out_dir: Path, backbone: Backbone, data: DatasetSplits, accelerator: Accelerator,
                     cache: Path, show: bool, started: float) -> dict:
    """The baselines without image training: zero-shot CLIP, or the stage-1 text classifier."""
    wheel = data.wheel
    if cfg.mode == "zeroshot":
        weight = zeroshot_weights(backbone, wheel, load_templates(wheel, cfg.text.templates), cache, accelerator.device)
        scale, stage1 = backbone.model.logit_scale.exp().item(), None  # CLIP's own learned temperature
    else:
        weight, stage1 = _text_classifier(backbone, wheel, cfg, cache, accelerator.device)
        scale = 1.0
    model = accelerator.prepare_model(backbone.model, evaluation_mode=True).eval()
    classify = clip_classifier(model, weight, scale, accelerator)
    results = {}
    for split in ("val", "test"):
        loader = accelerator.prepare_data_loader(make_loader(make_dataset(data[split], wheel, backbone.preprocess,
                                                                          cfg.data), cfg.data.eval_batch_size, False,
                                                             cfg.seed, cfg.data.num_workers))
        results[split] = compute_metrics(predict(classify, loader, accelerator, desc=f"eval {split}", progress=show),
                                         wheel)
    images = torch.stack([make_dataset(data["test"][:8], wheel, backbone.preprocess, cfg.data)[i]["image"]
                          for i in range(min(8, len(data["test"])))]).to(accelerator.device)
    summary = {"val": results["val"], "test": results["test"], "stage1": stage1, "epochs": 0,
               "parameters": {"trainable": 0, "added": 0, "by_group": {}},
               "num_samples": {s: len(data[s]) for s in SPLITS}, "skipped": data.skipped_summary()}
    if accelerator.is_main_process:
        _write_run_files(out_dir, cfg, wheel, backbone.identity, summary, started,
                         efficiency=efficiency(classify, images))
    return summary


def train_run(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Stage 1 + stage 2 on the configured data; writes the run directory and returns the summary."""
    started = time.time()
    out_dir = Path(out_dir)
    _resolve_paths(cfg)
    cfg = _prepare_out_dir(cfg, out_dir, resume)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    show = progress and main
    set_seed(cfg.seed)
    cache = cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    identity = backbone.identity
    with accelerator.main_process_first():
        data = load_splits(cfg.data, cfg.seed, cache)
    wheel = data.wheel
    if main and not resume:
        with _writing(out_dir):
            (out_dir / "plots").mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            for split in SPLITS:
                write_manifest(out_dir / "splits" / f"{split}.csv", data[split], wheel, split)

    if cfg.mode != "train":
        return _evaluate_frozen(cfg, out_dir, backbone, data, accelerator, cache, show, started)
    stage1_path = out_dir / "text_classifier.safetensors"
    if resume:
        text_weight = load_checkpoint(stage1_path, identity)["weight"]
        stage1 = json.loads((out_dir / "checkpoints" / "stage1.json").read_text(encoding="utf-8"))
    else:
        with accelerator.main_process_first():
            text_weight, stage1 = _text_classifier(backbone, wheel, cfg, cache, accelerator.device)
    model = build_run_model(backbone, wheel, cfg, cache, accelerator.device, text_weight)
    groups = param_groups(model)
    saved_names = saved_parameter_names(model, cfg)
    # Everything any phase tunes requires grad while the model is wrapped (DDP registers those).
    set_trainable(model, groups, set().union(*(trained_groups(p, cfg.train.train_backbone) for p in cfg.train.phases)))

    pseudo_mode = cfg.train.supervision == "pseudo"
    views = {"train": strong_view(backbone.preprocess_cfg.size, backbone.preprocess_cfg.mean,
                                  backbone.preprocess_cfg.std)} if pseudo_mode else {}
    datasets = {split: make_dataset(data[split], wheel, views.get(split, backbone.preprocess), cfg.data)
                for split in SPLITS}
    image_sets = dict(datasets)  # for the text-only baseline, which reads plain images
    sample_images = torch.stack([datasets["test"][i]["image"] for i in range(min(8, len(datasets["test"])))])
    if cache_applies(cfg):
        model.to(accelerator.device)
        with accelerator.main_process_first():
            datasets = cached_datasets(model, datasets, wheel, backbone.preprocess, identity, backbone.preprocess_cfg,
                                       cache, cfg.data.eval_batch_size, accelerator.device, show)
    loaders = {split: make_loader(datasets[split], cfg.data.batch_size if split == "train" else cfg.data.eval_batch_size,
                                  shuffle=split == "train", seed=cfg.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=accelerator.device.type == "cuda")
               for split in SPLITS}
    optimizer = build_optimizer(groups, cfg)
    epochs = phase_of_epoch(cfg.train.phases)
    steps_per_epoch = len(loaders["train"])
    scheduler = warmup_cosine(optimizer, round(cfg.train.warmup_epochs * steps_per_epoch), len(epochs) * steps_per_epoch)
    train_sampler = loaders["train"].sampler
    model, optimizer, scheduler, *prepared = accelerator.prepare(model, optimizer, scheduler,
                                                                  *(loaders[s] for s in SPLITS))
    loaders = dict(zip(SPLITS, prepared))
    plain = accelerator.unwrap_model(model)
    train_paths = [s.path for s in data["train"]]

    def classify(inputs: torch.Tensor):
        with accelerator.autocast():
            out = plain(inputs, return_stages=True)
        return out.logits, out.stage_logits

    text_only = clip_classifier(backbone.model, text_weight, 1.0, accelerator)

    def evaluate(fn, split: str, images: bool = False) -> tuple[dict, Predictions]:
        plain.eval()
        loader = accelerator.prepare_data_loader(make_loader(image_sets[split], cfg.data.eval_batch_size, False,
                                                             cfg.seed, cfg.data.num_workers)) if images else loaders[split]
        preds = predict(fn, loader, accelerator, desc=f"eval {split}", progress=show)
        return compute_metrics(preds, wheel), preds

    pseudo = _teacher_labels(text_only, data["train"], wheel, backbone, cfg, accelerator, show) if pseudo_mode else None

    def save_state() -> None:
        if main:
            _save_state(out_dir, plain, saved_names, optimizer, scheduler, state, identity)
        accelerator.wait_for_everyone()

    if resume:
        state = _load_state(out_dir, plain, optimizer, scheduler, identity)
        text_only_metrics = stage1.pop("text_only")
    else:
        text_only_metrics = {s: {k: evaluate(text_only, s, images=True)[0][k] for k in SCALARS} for s in ("val", "test")}
        state = Progress()
        if main:
            with _writing(out_dir):
                save_checkpoint(stage1_path, {"weight": text_weight}, identity)
                write_json(out_dir / "checkpoints" / "stage1.json", {**stage1, "text_only": text_only_metrics})
        save_state()
    if main:
        with _writing(out_dir / "metrics.jsonl"):  # rewritten from the state: a torn last line is repaired
            atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.records))

    with _stop_requests() as stop:
        while state.epoch < len(epochs):
            epoch = state.epoch + 1
            phase_no, phase = epochs[state.epoch]
            set_trainable(plain, groups, trained_groups(phase, cfg.train.train_backbone), phase.stages)
            plain.train()
            epoch_loader = skip_first_batches(loaders["train"], state.step_in_epoch) if state.step_in_epoch \
                else loaders["train"]
            # accelerate's loader re-seeds its sampler with its own epoch counter on every pass: keep both
            # at the run's epoch, so the order depends on (seed, epoch) only, also after a resume.
            epoch_loader.set_epoch(state.epoch)
            train_sampler.set_epoch(state.epoch)
            epoch_start = time.time()
            bar = tqdm(epoch_loader, desc=f"epoch {epoch}/{len(epochs)} (phase {phase_no})", leave=False,
                       disable=not show, initial=state.step_in_epoch, total=steps_per_epoch)
            for batch in bar:
                try:
                    step = train_step(model, batch, optimizer, scheduler, accelerator, cfg, phase.consistency,
                                      train_paths, pseudo)
                    for key in SUM_KEYS:
                        state.sums[key] += step[key]
                    bar.set_postfix(loss=f"{step['loss'] / step['n']:.4f}")
                except NonFiniteError as e:
                    if cfg.train.on_nonfinite != "skip":
                        raise RunError(f"{e}. Stopped; the last good state (step {state.global_step - state.step_in_epoch}"
                                       f" or later) is saved in {out_dir}/checkpoints; fix the data or lower the "
                                       "learning rate, then --resume (or set train.on_nonfinite=skip)") from None
                    state.skipped_batches.append(str(e))
                state.step_in_epoch += 1
                state.global_step += 1
                every = cfg.train.checkpoint_every_steps
                if (every and state.global_step % every == 0) or stop["signum"] is not None:
                    save_state()
                if stop["signum"] is not None:
                    raise TrainingInterrupted(f"interrupted by signal {stop['signum']} at epoch {epoch}, step "
                                              f"{state.step_in_epoch}; state saved: continue with --resume",
                                              stop["signum"])
            train_stats = epoch_stats(state.sums, accelerator)
            val, _ = evaluate(classify, "val")
            state.records.append({"epoch": epoch, "phase": phase_no, **train_stats, **_summary_scalars(val, "val"),
                                  "val_stage_accuracy": val.get("stage_accuracy"),
                                  "lr": {g["group"]: g["lr"] for g in optimizer.param_groups},
                                  "nga_weights": plain.nga_weights(), "fusion_weights": plain.fusion_weights(),
                                  "time_s": time.time() - epoch_start})
            if val["accuracy"] > state.best_accuracy:
                state.best_accuracy, state.best_epoch, state.best_val = val["accuracy"], epoch, val
                if main:
                    _save_weights(plain, saved_names, out_dir / "model.safetensors", identity)
            state.epoch, state.step_in_epoch, state.sums = epoch, 0, dict.fromkeys(SUM_KEYS, 0.0)
            save_state()
            if main:
                with _writing(out_dir / "metrics.jsonl"), open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(state.records[-1]) + "\n")
                if show:
                    print(f"epoch {epoch}: loss {train_stats['train_loss']:.4f}  val acc {val['accuracy']:.4f}  "
                          f"macro-F1 {val['macro_f1']:.4f}")

    if main:
        _save_weights(plain, saved_names, out_dir / "last.safetensors", identity)
    test_last, _ = evaluate(classify, "test")
    accelerator.wait_for_everyone()
    load_weights(plain, out_dir / "model.safetensors", identity)
    test, preds = evaluate(classify, "test")

    counts = {g: sum(p.numel() for p in params.values()) for g, params in groups.items()}
    tuned = set().union(*(trained_groups(p, cfg.train.train_backbone) for p in cfg.train.phases))
    summary = {
        "val": state.best_val, "test": test, "test_last": test_last, "text_only": text_only_metrics,
        "best_epoch": state.best_epoch, "epochs": len(epochs), "stage1": stage1,
        "parameters": {"trainable": sum(counts[g] for g in tuned),
                       "added": sum(n for g, n in counts.items() if g not in ("layernorms", "backbone")),
                       "by_group": counts},
        "num_samples": {s: len(data[s]) for s in SPLITS},
        "skipped": data.skipped_summary(),
        "nonfinite_batches_skipped": state.skipped_batches,
    }
    if main:
        _write_run_files(out_dir, cfg, wheel, identity, summary, started, resume=resume,
                         extraction_layers=plain.extraction_layers,
                         efficiency=efficiency(classify, sample_images.to(accelerator.device)))
        with _writing(out_dir):
            _write_predictions(out_dir / "predictions.csv", preds, data["test"], wheel)
            plot_curves(state.records, out_dir / "plots" / "curves.png")
            plot_confusion(test["confusion_matrix"], wheel.classes, out_dir / "plots" / "confusion.png")
            plot_stage_weights(state.records, out_dir / "plots" / "stage_weights.png",
                               layer_names=[[f"L{layer}" for layer in stage] for stage in plain.stages])
    return summary


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
        self.accelerator = make_accelerator(self.cfg)
        self.model = build_run_model(self.backbone, self.wheel, self.cfg, cache_dir_of(self.cfg), self.accelerator.device)
        load_weights(self.model, self.run_dir / "model.safetensors", self.backbone.identity)
        self.model = self.accelerator.prepare_model(self.model, evaluation_mode=True).eval()

    def _classify(self, images: torch.Tensor):
        with self.accelerator.autocast():
            out = self.model.forward_stages(images)
        return out.logits, out.stage_logits

    def evaluate(self, split: str = "test", progress: bool = True) -> dict:
        """Metrics on one of the run's own saved splits."""
        data: DatasetSplits = load_split_files(self.run_dir / "splits", self.wheel)
        if split not in data.splits:
            raise RunError(f"{self.run_dir}/splits has no {split}.csv")
        dataset = make_dataset(data[split], self.wheel, self.backbone.preprocess, self.cfg.data)
        loader = self.accelerator.prepare_data_loader(
            make_loader(dataset, self.cfg.data.eval_batch_size, False, self.cfg.seed, self.cfg.data.num_workers))
        return compute_metrics(predict(self._classify, loader, self.accelerator, progress=progress), self.wheel)

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
        logits, _ = self._classify(images.to(self.accelerator.device))
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Prediction([self.wheel.classes[i] for i in probs.argmax(axis=1)], probs, self.wheel.classes)


def load_run(run_dir: str | Path, device: Optional[str] = None, precision: Optional[str] = None) -> TrainedRun:
    """A trained model ready for ``.predict(images)`` and ``.evaluate(split)``; ``device`` and
    ``precision`` (fp32 | bf16 | fp16 autocast) replace the run's own settings."""
    return TrainedRun(Path(run_dir), device, precision)
