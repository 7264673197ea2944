"""Where a run computes: processes and devices (accelerate), numeric precision, cache folders."""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

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

    def lower_frozen(self, model: nn.Module, trained: Iterable[nn.Parameter] = ()) -> None:
        """``lower_frozen`` at this runtime's precision (nothing to do in fp32)."""
        if self.precision != "fp32":
            lower_frozen(model, DTYPES[self.precision], trained)


def lower_frozen(model: nn.Module, dtype: torch.dtype, trained: Iterable[nn.Parameter] = ()) -> None:
    """Keep the image tower's frozen weights in the low precision ``dtype`` that autocast runs in.

    Autocast casts them to exactly these values at every call, so results stay the same bit for
    bit; what goes is a fresh low-precision copy of the tower's weights in every forward pass, and
    half their memory. LayerNorms, the ``trained`` parameters and everything outside the tower
    (prompts, head) stay in fp32."""
    keep = {id(p) for p in trained}
    keep |= {id(p) for m in model.visual.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for p in model.visual.parameters():
        if id(p) not in keep:
            p.data = p.data.to(dtype)


def make_runtime(cfg: Config, log_with: Optional[list[str]] = None, project_dir: Optional[Path] = None) -> Runtime:
    """The config's device and precision; ``log_with`` trackers write under ``project_dir``."""
    return Runtime(cfg.device, cfg.precision, log_with, project_dir)


def cache_dir_of(cfg: Config) -> Path:
    """Text embeddings, feature and synthetic-data caches: ``cache_dir`` or ~/.cache/hclafter."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "hclafter"
