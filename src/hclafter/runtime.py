"""Where a run computes: processes and devices (accelerate), numeric precision, cache folders."""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from .config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """The requested device or precision cannot be used here."""


class Runtime(Accelerator):
    """accelerate's Accelerator, with the precision applied per instance.

    accelerate fixes mixed precision once per process, but a library user switches it between
    calls (a notebook evaluating in bf16 after an fp32 run, a sweep), so accelerate runs in full
    precision and this class supplies the autocast and, for fp16, the gradient scaler.
    """

    def __init__(self, device: str = "auto", precision: str = "fp32", log_with: Optional[list[str]] = None,
                 project_dir: Optional[Path] = None) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise DeviceError("device: 'cuda' requested but no CUDA device is available; use device=auto or cpu")
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        if precision == "fp16" and cpu:
            raise DeviceError("precision: fp16 needs a CUDA device (CPUs have no fp16 autocast); "
                                "use precision=bf16 or fp32")
        try:
            # Phases switch groups on and off, so DDP must tolerate parameters without gradients.
            super().__init__(cpu=cpu, mixed_precision="no", log_with=log_with or None, project_dir=project_dir,
                             kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        except ValueError as e:  # accelerate keeps one device per process
            raise DeviceError(f"device: {e}") from None
        self.precision = precision
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def autocast(self, autocast_handler: Optional[Any] = None) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32")

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        super().backward(self.grad_scaler.scale(loss), **kwargs)


def make_runtime(cfg: Config, log_with: Optional[list[str]] = None, project_dir: Optional[Path] = None) -> Runtime:
    """The config's device and precision; ``log_with`` trackers write under ``project_dir``."""
    return Runtime(cfg.device, cfg.precision, log_with, project_dir)


def cache_dir_of(cfg: Config) -> Path:
    """Text embeddings, feature and synthetic-data caches: ``cache_dir`` or ~/.cache/hclafter."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "hclafter"
