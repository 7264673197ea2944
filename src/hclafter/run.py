"""A training run end to end, its run directory, and loading a finished run for inference."""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file, save_file

from . import __version__
from .backbone import Backbone, backbone_from_config
from .config import Config, load_config, save_config
from .data import SPLITS, DatasetSplits, load_split_files, load_splits, make_dataset, make_loader, write_manifest
from .emotions import Wheel
from .evaluation import Predictions, compute_metrics, predict
from .model import HybridCascadeLaFTer, build_model
from .plots import plot_confusion, plot_curves, plot_stage_weights
from .text import class_texts, encode_texts, load_descriptions, load_templates, train_text_classifier
from .training import (build_optimizer, param_groups, phase_of_epoch, saved_parameter_names, set_trainable,
                       train_epoch, trained_groups, warmup_cosine)

SCALARS = ("accuracy", "macro_f1", "polarity_accuracy")


class RunError(RuntimeError):
    """A run directory is incomplete or does not match the backbone it names."""


def cache_dir_of(cfg: Config) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "hclafter"


def make_accelerator(cfg: Config) -> Accelerator:
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available; use device=auto or cpu")
    return Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision))


def _resolve_paths(cfg: Config) -> None:
    """Make file paths absolute so the saved config re-creates the run from any directory."""
    for obj, key in ((cfg.backbone, "pretrained"), (cfg.data, "root"), (cfg.text, "descriptions"), (cfg, "cache_dir")):
        value = getattr(obj, key)
        if value is not None and Path(value).expanduser().exists():
            setattr(obj, key, str(Path(value).expanduser().resolve()))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _save_weights(model: HybridCascadeLaFTer, names: Sequence[str], path: Path) -> None:
    state = model.state_dict()
    tmp = path.with_suffix(".tmp")
    save_file({n: state[n].detach().float().contiguous().cpu() for n in names}, str(tmp))
    tmp.replace(path)


def load_weights(model: HybridCascadeLaFTer, path: Path) -> None:
    if not path.is_file():
        raise RunError(f"weights file missing: {path}")
    saved = load_file(str(path))
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


def train_run(cfg: Config, out_dir: Path, progress: bool = True) -> dict:
    """Stage 1 + stage 2 on the configured data; writes the run directory and returns the summary."""
    started = time.time()
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    progress = progress and main
    set_seed(cfg.seed)
    _resolve_paths(cfg)
    out_dir = Path(out_dir)
    cache = cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    with accelerator.main_process_first():
        data = load_splits(cfg.data, cfg.seed, cache)
    wheel = data.wheel
    if main:
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        for split in SPLITS:
            write_manifest(out_dir / "splits" / f"{split}.csv", data[split], wheel, split)

    with accelerator.main_process_first():
        text_weight, stage1 = _text_classifier(backbone, wheel, cfg, cache, accelerator.device)
    model = build_model(backbone, wheel.num_classes, cfg.model)
    with torch.no_grad():
        model.classifier.linear.weight.copy_(text_weight)
    groups = param_groups(model)
    saved_names = saved_parameter_names(model, cfg)
    set_trainable(groups, set())

    loaders = {split: make_loader(make_dataset(data[split], wheel, backbone.preprocess, cfg.data),
                                  cfg.data.batch_size if split == "train" else cfg.data.eval_batch_size,
                                  shuffle=split == "train", seed=cfg.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=accelerator.device.type == "cuda")
               for split in SPLITS}
    optimizer = build_optimizer(groups, cfg)
    epochs = phase_of_epoch(cfg.train.phases)
    steps_per_epoch = len(loaders["train"])
    scheduler = warmup_cosine(optimizer, round(cfg.train.warmup_epochs * steps_per_epoch), len(epochs) * steps_per_epoch)
    model, optimizer, scheduler, *prepared = accelerator.prepare(model, optimizer, scheduler,
                                                                  *(loaders[s] for s in SPLITS))
    loaders = dict(zip(SPLITS, prepared))
    plain = accelerator.unwrap_model(model)

    def classify(images: torch.Tensor):
        with accelerator.autocast():
            out = plain.forward_stages(images)
        return out.logits, out.stage_logits

    def text_only(images: torch.Tensor):
        with accelerator.autocast():
            features = backbone.model.encode_image(images)
        return F.normalize(features.float(), dim=-1) @ text_weight.to(features.device).T, None

    def evaluate(fn, split: str) -> tuple[dict, Predictions]:
        plain.eval()
        preds = predict(fn, loaders[split], accelerator, desc=f"eval {split}", progress=progress)
        return compute_metrics(preds, wheel), preds

    summary: dict[str, Any] = {"text_only": {s: {k: evaluate(text_only, s)[0][k] for k in SCALARS}
                                             for s in ("val", "test")}}
    records: list[dict] = []
    best_acc, best_epoch, best_val = -1.0, 0, None
    if main:
        (out_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    for epoch, (phase_no, phase) in enumerate(epochs, start=1):
        set_trainable(groups, trained_groups(phase, cfg.train.train_backbone))
        epoch_start = time.time()
        train_stats = train_epoch(model, loaders["train"], optimizer, scheduler, accelerator, cfg, phase.consistency,
                                  desc=f"epoch {epoch}/{len(epochs)} (phase {phase_no})", progress=progress)
        val, _ = evaluate(classify, "val")
        record = {"epoch": epoch, "phase": phase_no, **train_stats, **_summary_scalars(val, "val"),
                  "val_stage_accuracy": val.get("stage_accuracy"),
                  "lr": {g["group"]: g["lr"] for g in optimizer.param_groups},
                  "nga_weights": plain.nga_weights(), "fusion_weights": plain.fusion_weights(),
                  "time_s": time.time() - epoch_start}
        records.append(record)
        if main:
            with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if progress:
                print(f"epoch {epoch}: loss {train_stats['train_loss']:.4f}  val acc {val['accuracy']:.4f}  "
                      f"macro-F1 {val['macro_f1']:.4f}")
        if val["accuracy"] > best_acc:
            best_acc, best_epoch, best_val = val["accuracy"], epoch, val
            if main:
                _save_weights(plain, saved_names, out_dir / "model.safetensors")
    if main:
        _save_weights(plain, saved_names, out_dir / "last.safetensors")
    summary["test_last"], _ = evaluate(classify, "test")
    accelerator.wait_for_everyone()
    load_weights(plain, out_dir / "model.safetensors")
    test, preds = evaluate(classify, "test")

    counts = {g: sum(p.numel() for p in params.values()) for g, params in groups.items()}
    tuned = set().union(*(trained_groups(p, cfg.train.train_backbone) for p in cfg.train.phases))
    summary.update({
        "val": best_val, "test": test, "best_epoch": best_epoch, "epochs": len(epochs),
        "stage1": stage1,
        "parameters": {"trainable": sum(counts[g] for g in tuned),
                       "added": sum(counts[g] for g in ("prompts", "classifier", "stage_adapters", "fusion", "nga")),
                       "by_group": counts},
        "num_samples": {s: len(data[s]) for s in SPLITS},
        "skipped": data.skipped_summary(),
        "time_s": time.time() - started,
    })
    if main:
        _write_json(out_dir / "run.json", {"classes": list(wheel.classes), "label_space": wheel.name,
                                           "wheel": dataclasses.asdict(wheel), "backbone": backbone.identity,
                                           "extraction_layers": plain.extraction_layers,
                                           "hclafter_version": __version__, "torch_version": torch.__version__})
        _write_json(out_dir / "summary.json", summary)
        _write_predictions(out_dir / "predictions.csv", preds, data["test"], wheel)
        plot_curves(records, out_dir / "plots" / "curves.png")
        plot_confusion(test["confusion_matrix"], wheel.classes, out_dir / "plots" / "confusion.png")
        plot_stage_weights(records, out_dir / "plots" / "stage_weights.png",
                           layer_names=[[f"L{layer}" for layer in stage] for stage in plain.stages])
    return summary


@dataclass
class Prediction:
    labels: list[str]
    distributions: np.ndarray  # [N, C], columns in ``classes`` order
    classes: tuple[str, ...]


class TrainedRun:
    """A finished run, rebuilt from its directory: backbone by identity plus the saved weights."""

    def __init__(self, run_dir: Path, device: Optional[str] = None) -> None:
        self.run_dir = Path(run_dir)
        for name in ("config.yaml", "run.json", "model.safetensors"):
            if not (self.run_dir / name).is_file():
                raise RunError(f"{self.run_dir} is not a finished run: {name} is missing")
        self.cfg = load_config([self.run_dir / "config.yaml"])
        if device is not None:
            self.cfg.device = device
        info = json.loads((self.run_dir / "run.json").read_text(encoding="utf-8"))
        w = info["wheel"]
        self.wheel = Wheel(w["name"], tuple(w["classes"]), tuple(w["polarity"]),
                           tuple(map(tuple, w["distances"])) if w.get("distances") else None)
        self.backbone = backbone_from_config(self.cfg.backbone)
        if self.backbone.identity != info["backbone"]:
            raise RunError(f"{self.run_dir}: backbone differs from the one the run was trained with "
                           f"(run: {info['backbone'].get('weights')}, now: {self.backbone.identity.get('weights')}); "
                           "pass the same weights file")
        self.model = build_model(self.backbone, self.wheel.num_classes, self.cfg.model)
        load_weights(self.model, self.run_dir / "model.safetensors")
        self.accelerator = make_accelerator(self.cfg)
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
                if isinstance(image, Image.Image):
                    tensors.append(self.backbone.preprocess(image.convert("RGB")))
                    continue
                try:
                    with Image.open(image) as im:
                        tensors.append(self.backbone.preprocess(im.convert("RGB")))
                except (OSError, ValueError) as e:
                    raise RunError(f"{image}: cannot read image ({e})") from None
            images = torch.stack(tensors)
        logits, _ = self._classify(images.to(self.accelerator.device))
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Prediction([self.wheel.classes[i] for i in probs.argmax(axis=1)], probs, self.wheel.classes)


def load_run(run_dir: str | Path, device: Optional[str] = None) -> TrainedRun:
    """A trained model ready for ``.predict(images)`` and ``.evaluate(split)``."""
    return TrainedRun(Path(run_dir), device)
