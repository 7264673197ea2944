"""How numbers read in every table we print (terminal, Markdown, HTML): one function per kind of cell."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def pct(value: Optional[float], digits: int = 2) -> str:
    """A fraction as a percentage, "–" where there is none."""
    return "–" if value is None else f"{100 * value:.{digits}f}"


def pm(value: tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    """"mean ± std" of a (mean, std) pair; the mean alone where the std is nan (one seed)."""
    mean, std = value
    if math.isnan(std):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def difference(mean: float, ci: Sequence[float]) -> str:
    """An accuracy difference and its CI in points: "+1.2 [-0.3, +2.5]"."""
    return f"{100 * mean:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Text cells (a table builder's) as a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"
