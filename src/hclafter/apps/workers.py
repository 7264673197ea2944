"""Local worker processes for the commands that run many runs (``sweep``, ``demo``, ``tune``)."""
from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies (Linux)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` local processes (spawned, so nothing is inherited from this one), each with an
    equal share of this machine's torch threads: the toy CLIP's small steps are bound by per-op
    overhead, so two one-thread processes outrun one two-thread process on 2 cores (BENCHMARKS.md).
    A worker is sent SIGTERM when this process dies, so its run stops at a saved state, resumable."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                               initargs=(workers,))


def _worker_start(workers: int) -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
