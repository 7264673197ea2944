"""Experiment tracking through accelerate's trackers (TensorBoard by default; W&B and MLflow offline).

A run logs its resolved config once, then per optimisation step the losses and each parameter
group's learning rate, per epoch the accuracies, the validation loss, NGA σ and layer weights and
the stage fusion weights, and at the end the run's figures. Everything is written under the run
directory (``<run>/logs``), so nothing leaves the machine: ``tensorboard --logdir runs``.
"""
from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.config import ConfigError, Config, to_dict

PROJECT = "hclafter"  # the TensorBoard folder under <run>/logs, the W&B and MLflow project name
# the package each tracker needs
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def logs_dir(out_dir: Path) -> Path:
    """Where a run's trackers write (TensorBoard event files in ``logs/hclafter``)."""
    return Path(out_dir) / "logs"


def tracker_names(cfg: Config) -> list[str]:
    """The configured trackers, each checked to be installed (a missing one is a config error
    that says how to fix it, not a silent run without tracking). Frozen baselines train nothing."""
    if cfg.mode != "train":
        return []
    missing = [name for name in cfg.train.log_with if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ConfigError(f"train.log_with: {', '.join(missing)} not installed; pip install "
                          f"{' '.join(PACKAGES[m] for m in missing)}, or leave it out of train.log_with")
    return list(cfg.train.log_with)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """The config as flat ``key.sub: value`` scalars, the form every tracker takes as hyperparameters."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    value = node if isinstance(node, (bool, int, float, str)) else str(node)
    return {prefix[:-1]: value}


def start(runtime: Any, cfg: Config, out_dir: Path) -> None:
    """Open the trackers of the runtime (W&B offline, MLflow in a file store under the run)."""
    if not runtime.log_with:
        return
    names = [str(t) for t in runtime.log_with]
    init_kwargs: dict[str, dict] = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {"mode": "offline", "dir": str(logs_dir(out_dir)), "name": Path(out_dir).name}
    if "mlflow" in names and runtime.is_main_process:
        import mlflow

        mlflow.set_tracking_uri(logs_dir(out_dir).resolve().joinpath("mlruns").as_uri())
        init_kwargs["mlflow"] = {"run_name": Path(out_dir).name}
    logs_dir(out_dir).mkdir(parents=True, exist_ok=True)
    runtime.init_trackers(PROJECT, config=_flat(to_dict(cfg)), init_kwargs=init_kwargs)


def log_step(runtime: Any, step: int, losses: dict[str, float], learning_rates: dict[str, float]) -> None:
    """One optimisation step: its mean losses and every parameter group's learning rate."""
    if runtime.log_with:
        runtime.log({**{f"train/{k}": v for k, v in losses.items()},
                     **{f"lr/{group}": lr for group, lr in learning_rates.items()}}, step=step)


def log_round(runtime: Any, step: int, record: dict, sigmas: dict[str, float]) -> None:
    """One round's record (as metrics.jsonl holds it) and the NGA σ's, at the round's last step."""
    if not runtime.log_with:
        return
    values: dict[str, float] = {"epoch": record["epoch"], "phase": record["phase"]}
    for key, value in record.items():
        if isinstance(value, (int, float)) and key.startswith(("train_", "val_")):
            split, _, name = key.partition("_")
            values[f"{split}/{name}" if split == "val" else f"train_epoch/{name}"] = value
    for s, accuracy in enumerate(record.get("val_stage_accuracy") or [], start=1):
        values[f"val/stage{s}_accuracy"] = accuracy
    for s, weights in enumerate(record.get("nga_weights") or [], start=1):
        for k, weight in enumerate(weights, start=1):
            values[f"nga/stage{s}_weight{k}"] = weight
    values.update({f"nga/{name}": sigma for name, sigma in sigmas.items()})
    for s, weight in enumerate(record.get("fusion_weights") or [], start=1):
        values[f"fusion/stage{s}"] = weight
    runtime.log(values, step=step)


def log_figures(runtime: Any, figures: dict[str, Path], step: Optional[int] = None) -> None:
    """PNG figures by name (confusion matrix, curves, weights) as images ``figures/<name>`` in every tracker."""
    if not runtime.log_with or not runtime.is_main_process:
        return
    figures = {f"figures/{name}": Path(path) for name, path in figures.items() if Path(path).is_file()}
    images = {tag: np.asarray(Image.open(path).convert("RGB")) for tag, path in figures.items()}
    for tracker in runtime.trackers:
        if tracker.name == "tensorboard":
            for tag, image in images.items():
                tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image] for tag, image in images.items()}, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            for path in figures.values():
                mlflow.log_artifact(str(path), artifact_path="figures")


def finish(runtime: Any) -> None:
    """Close the trackers (flushes TensorBoard's event files). Not ``end_training``: that also
    destroys the process group, which the next run of a sweep under torchrun still needs."""
    for tracker in runtime.trackers:
        tracker.finish()


def sigmas(named: Sequence[tuple[str, Any]]) -> dict[str, float]:
    """The scalar parameters of the ``nga`` group (NGA's σ per stage) by parameter name."""
    return {name: float(p.detach().float().item()) for name, p in named if p.numel() == 1}


def hardware(runtime: Any) -> dict[str, Any]:
    """Where a run computed, for its report: device and its name, processes, CPU cores, platform, and
    torch's thread count (on CPU it changes the order of float sums, so the last digits of a run)."""
    device = runtime.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "processes": runtime.num_processes,
            "cpu_cores": os.cpu_count(), "precision": runtime.precision, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _cpu_model() -> Optional[str]:
    """The CPU's model name on Linux (platform.processor() is often empty there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None
