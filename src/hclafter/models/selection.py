"""Choosing a setting on the validation split, as the baselines' own protocols do: the score of a
candidate, the best of a list, and the CoOp/CLIP linear-probe search (a log grid, then bisection
rounds around the best). Callers score candidates on validation predictions only."""
from __future__ import annotations

import math
from typing import Callable, Iterable, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")
Score = tuple[float, float]

# CoOp's lpclip: C in 1e6 ... 1e-6 two decades apart, then 8 bisection rounds around the best.
LOG_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
LOG_ROUNDS = 8


def validation_score(logits: torch.Tensor, labels: torch.Tensor) -> Score:
    """(accuracy, −cross-entropy) of validation logits: accuracy decides, and the loss breaks its ties,
    which small validation splits have often."""
    logits, labels = logits.float(), labels.to(logits.device)
    return (logits.argmax(-1) == labels).float().mean().item(), -F.cross_entropy(logits, labels).item()


def best_on_validation(candidates: Iterable[T], score: Callable[[T], Score]) -> T:
    """The candidate with the highest score; of equal ones the first."""
    best, best_score = None, None
    for candidate in candidates:
        value = score(candidate)
        if best_score is None or value > best_score:
            best, best_score = candidate, value
    if best_score is None:
        raise ValueError("no candidate to choose from")
    return best


def log_search(score: Callable[[float], Score], grid: tuple[float, ...] = LOG_GRID, rounds: int = LOG_ROUNDS) -> float:
    """The best value of ``grid`` (log-spaced), then ``rounds`` bisection rounds: each compares the best so
    far with the values half the current step away on either side (in log10), keeps the best, and
    halves the step (CoOp's lpclip starts at one decade either side of the grid's best, as here)."""
    scores: dict[float, Score] = {}

    def scored(value: float) -> Score:
        if value not in scores:
            scores[value] = score(value)
        return scores[value]

    best = best_on_validation(grid, scored)
    step = abs(math.log10(grid[0]) - math.log10(grid[1])) / 2
    for _ in range(rounds):
        best = best_on_validation((best, best * 10 ** -step, best * 10 ** step), scored)
        step /= 2
    return best
