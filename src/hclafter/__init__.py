"""hclafter: visual emotion recognition with CLIP — HybridCascade-LaFTer, its baselines and tools.

The package's layers, each importing only those below it: ``core`` (settings, files, runtime,
metrics, statistics) → ``models`` and ``data`` → ``engine`` (a run: training, evaluation,
inference, its files) → ``reporting`` (tables, figures, pages) → ``apps`` (the commands). The
functions below are the public API; they import what they need when called.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .version import __version__

__all__ = ["__version__", "from_pretrained", "load_config", "load_run", "train"]

if TYPE_CHECKING:
    from .apps.export import EmotionModel
    from .core.config import Config
    from .engine.inference import TrainedRun


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> "Config":
    """Settings from YAML files and ``key.sub=value`` overrides; see ``hclafter.core.config.load_config``."""
    from .core.config import load_config as _load_config

    return _load_config(paths, overrides)


def train(cfg: "Config", out_dir: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train (or resume) a run into ``out_dir`` as ``hclafter train`` does; returns its summary."""
    from .apps.runs import train as _train

    return _train(cfg, Path(out_dir), progress, resume)


def load_run(run_dir: str | Path, device: Optional[str] = None, precision: Optional[str] = None) -> "TrainedRun":
    """A trained run ready for ``.predict(images)``; see ``hclafter.engine.inference.load_run``."""
    from .engine.inference import load_run as _load_run

    return _load_run(run_dir, device, precision)


def from_pretrained(model_dir_or_id: str | Path, **kwargs: Any) -> "EmotionModel":
    """A model exported with ``hclafter export RUN --format hf`` (a local directory or a Hub id);
    see ``hclafter.apps.export.EmotionModel``."""
    from .apps.export import EmotionModel

    return EmotionModel.from_pretrained(model_dir_or_id, **kwargs)
