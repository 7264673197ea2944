"""hclafter: visual emotion recognition with CLIP — HybridCascade-LaFTer, its baselines and tools."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["__version__", "from_pretrained", "load_run"]

if TYPE_CHECKING:
    from .apps.export import EmotionModel
    from .engine.inference import TrainedRun


def load_run(run_dir: Any, device: Any = None, precision: Any = None) -> "TrainedRun":
    """A trained run ready for ``.predict(images)``; see ``hclafter.inference.load_run``."""
    from .engine.inference import load_run as _load_run

    return _load_run(run_dir, device, precision)


def from_pretrained(model_dir_or_id: Any, **kwargs: Any) -> "EmotionModel":
    """A model exported with ``hclafter export RUN --format hf`` (a local directory or a Hub id);
    see ``hclafter.export.EmotionModel``."""
    from .apps.export import EmotionModel

    return EmotionModel.from_pretrained(model_dir_or_id, **kwargs)
