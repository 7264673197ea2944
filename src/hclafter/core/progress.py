"""What a long job shows while it works: progress bars on a terminal, plain lines in a log file.

A bar redraws itself with carriage returns, which turns a log written to a file (``train ... >
log.txt 2>&1``) into a few unreadable lines; so bars are drawn only when stderr is a terminal,
and otherwise each finished job (an evaluation, a pass over the data) says so in one line.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def interactive() -> bool:
    """Whether stderr is a terminal (then bars are drawn; otherwise one line per job)."""
    return sys.stderr.isatty()


def say(message: str) -> None:
    """One line of progress on stdout, flushed at once so that logs interleave in order."""
    print(message, flush=True)


def bar(iterable: Iterable[T], desc: str, enabled: bool = True, total: Optional[int] = None, initial: int = 0) -> tqdm:
    """A progress bar on a terminal; when ``enabled`` is false or stderr is not a terminal, a
    silent pass-through that still accepts ``set_postfix``."""
    return tqdm(iterable, desc=desc, leave=False, disable=not (enabled and interactive()), total=total,
                initial=initial, dynamic_ncols=True)



def finished(desc: str, what: str, started: float, enabled: bool = True) -> None:
    """The one line that stands for a bar when stderr is not a terminal ("eval test: 96 images in 1.2 s")."""
    if enabled and not interactive():
        say(f"{desc}: {what} in {time.time() - started:.1f} s")
