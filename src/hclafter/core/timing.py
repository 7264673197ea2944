"""The one timer: wall-clock seconds of callables, interleaved so a busy machine slows all alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, with CUDA work finished before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(fns: Sequence[Callable[[], object]], repeats: int, device: torch.device,
                warmup: int = 1) -> list[list[float]]:
    """Seconds of ``repeats`` calls of each of ``fns``, after ``warmup`` untimed rounds, in rounds
    whose order alternates forwards and backwards (ABBA, so no side always goes first)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(repeats):
        for i in (order if r % 2 == 0 else order[::-1]):
            times[i].append(timed(fns[i], device))
    return times


def timing_noise(times: Sequence[Sequence[float]]) -> float:
    """How disturbed the machine was: the largest median / minimum − 1 over the measurements."""
    return max(statistics.median(t) / min(t) for t in times) - 1


def per_image_ms(times: Sequence[float], batch: int) -> float:
    """Median milliseconds per image of timed batches of ``batch`` images."""
    return 1000.0 * statistics.median(times) / batch
