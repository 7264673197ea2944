"""hclafter: visual emotion recognition with CLIP — HybridCascade-LaFTer, its baselines and tools."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .inference import TrainedRun


def load_run(run_dir: Any, device: Any = None, precision: Any = None) -> "TrainedRun":
    """A trained run ready for ``.predict(images)``; see ``hclafter.inference.load_run``."""
    from .inference import load_run as _load_run

    return _load_run(run_dir, device, precision)
