"""The statistics of the evidence protocol, recomputable from the runs' ``predictions.csv``.

A table compares the headline method with every other row by the paired accuracy difference
over the same test images (pooled across seeds), its percentile-bootstrap CI and McNemar's exact
p, and says in words whether the difference is distinguishable. Distributions are compared after
temperature scaling fitted on validation, with the expected calibration error next to them.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import binom


@dataclass(frozen=True)
class PairedDifference:
    """Mean accuracy difference (a − b) over paired predictions and its bootstrap CI."""

    mean: float
    low: float
    high: float
    level: float

    @property
    def ci(self) -> tuple[float, float]:
        return self.low, self.high


def _paired_correct(correct_a: ArrayLike, correct_b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must be 1-D arrays of the same length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no paired predictions to compare")
    for name, x in (("correct_a", a), ("correct_b", b)):
        if not np.isin(x, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1): whether each prediction is correct")
    return a.astype(np.int64), b.astype(np.int64)


def paired_bootstrap_ci(correct_a: ArrayLike, correct_b: ArrayLike, n_boot: int = 10000, seed: int = 0,
                        level: float = 0.95, groups: Optional[Sequence[Hashable]] = None) -> PairedDifference:
    """Mean of ``correct_a − correct_b`` and its percentile CI from resampling units with replacement.

    The arrays are paired predictions of two methods, pooled across seeds by concatenation. A unit
    is one entry, or with ``groups`` (e.g. image paths) one group: an image predicted under three
    seeds is then resampled as one, so agreement between seeds does not pass for more evidence
    than the test set holds. Each replicate is the pooled mean over the drawn units. Drawing the
    ``m`` units with replacement is done as multinomial counts over the distinct (sum, size) unit
    values: the same distribution, in memory that does not grow with the test set. A given
    ``seed`` gives the same CI.
    """
    a, b = _paired_correct(correct_a, correct_b)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    d = a - b
    if groups is None:
        sums, sizes = d, np.ones_like(d)
    else:
        if len(groups) != len(d):
            raise ValueError(f"groups has {len(groups)} entries for {len(d)} paired predictions")
        _, unit = np.unique(np.asarray(groups), return_inverse=True)
        sums, sizes = np.bincount(unit, weights=d).astype(np.int64), np.bincount(unit)
    values, counts = np.unique(np.stack([sums, sizes], axis=1), axis=0, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(len(sums), counts / counts.sum(), size=n_boot)
    replicates = (draws @ values[:, 0]) / (draws @ values[:, 1])
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(float(d.mean()), float(low), float(high), level)


def mcnemar_exact(correct_a: ArrayLike, correct_b: ArrayLike) -> float:
    """Exact two-sided McNemar p: a binomial test of the discordant pairs against 1/2.

    With ``n01`` pairs only a is right, ``n10`` only b, ``n = n01 + n10``:
    ``p = min(1, 2·P(X ≤ min(n01, n10)))``, ``X ~ Bin(n, 1/2)``; no discordant pair gives 1.
    Pooled seeds count as separate pairs, which overstates the evidence when seeds agree; the
    verdict therefore also asks the image-level bootstrap CI to exclude zero.
    """
    a, b = _paired_correct(correct_a, correct_b)
    only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    n = only_a + only_b
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), n, 0.5)))


def verdict(diff_ci: tuple[float, float], p: float, alpha: float = 0.05) -> str:
    """``better`` / ``worse`` only when the CI of (headline − other) excludes 0 on that side and
    ``p < alpha``; otherwise the two are not distinguishable at this level."""
    low, high = diff_ci
    if low > high:
        raise ValueError(f"diff_ci must be (low, high), got {diff_ci}")
    if p < alpha and low > 0:
        return "better"
    if p < alpha and high < 0:
        return "worse"
    return f"not distinguishable at {100 * (1 - alpha):g} %"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the k-th smallest of m is multiplied
    by m − k + 1, made non-decreasing in that order and capped at 1. Rejecting where the adjusted p
    is below α keeps the family-wise error rate at α over all m comparisons."""
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# --- calibration -----------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) over seeds; the std is nan for a single seed
    (one run says nothing about the spread)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def _logits_and_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"expected [N, C] scores and N labels (N > 0), got {z.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {z.shape[1]})")
    if not np.isfinite(z).all():
        raise ValueError("scores must be finite")
    return z, y


def negative_log_likelihood(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    """Mean NLL of the labels under ``softmax(logits / temperature)``."""
    z, y = _logits_and_labels(logits, labels)
    return float(-log_softmax(z / temperature, axis=1)[np.arange(len(y)), y].mean())


def scaled_probabilities(logits: ArrayLike, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)``: the distributions the protocol compares."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def fit_temperature(logits_val: ArrayLike, labels_val: ArrayLike, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """The temperature ``T`` in ``bounds`` minimising the validation NLL of ``softmax(logits / T)``.

    NLL is convex in ``1/T``, so it has one minimum along ``log T``, found by bounded Brent search
    (deterministic). A result at a bound means validation cannot pin T down (e.g. every sample is
    classified correctly, so sharper is always better). Log-probabilities serve as logits.
    """
    z, y = _logits_and_labels(logits_val, labels_val)
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    rows = np.arange(len(y))
    result = minimize_scalar(lambda log_t: -log_softmax(z / math.exp(log_t), axis=1)[rows, y].mean(),
                             bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """ECE: over equal-width confidence bins ``((k-1)/bins, k/bins]``, the sample-weighted mean of
    |accuracy − mean confidence|, confidence being the top class probability."""
    p, y = _logits_and_labels(probs, labels)
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, bins) - np.bincount(index, confidence, bins))
    return float(gap.sum() / count.sum())


# --- runs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPredictions:
    """One run's predictions as its ``predictions.csv`` holds them (read by
    ``hclafter.engine.runfiles.read_predictions``); classes by name."""

    paths: tuple[str, ...]
    labels: np.ndarray  # [N] indices into ``classes``
    predictions: np.ndarray  # [N] indices into ``classes``
    probabilities: np.ndarray  # [N, C] columns in ``classes`` order
    classes: tuple[str, ...]
    logits: Optional[np.ndarray] = None  # [N, C] fused logits (``z_`` columns), when the file has them
    targets: Optional[np.ndarray] = None  # [N, C] target distributions (``t_`` columns), when the file has them
    stages: Optional[np.ndarray] = None  # [S, N, C] each stage's probabilities (``s<k>_`` columns), when there


# (labels, predictions) or (labels, predictions, image ids) of one seed, or that seed's file read.
SeedPredictions = Union[tuple, RunPredictions]


@dataclass(frozen=True)
class Comparison:
    """The headline method against one other method, over the same test images and seeds."""

    difference: PairedDifference  # headline − other accuracy, pooled over seeds
    p_value: float  # McNemar's exact p over the pooled pairs
    verdict: str
    headline_accuracy: tuple[float, float]  # mean, std (ddof 1; nan with one seed) over seeds
    other_accuracy: tuple[float, float]
    test_sizes: tuple[int, ...]  # test images per seed
    bootstrap_units: int  # distinct test images when ids are known, else pooled predictions


def _as_triple(seed_preds: SeedPredictions) -> tuple[np.ndarray, np.ndarray, Optional[list]]:
    if isinstance(seed_preds, RunPredictions):
        return seed_preds.labels, seed_preds.predictions, list(seed_preds.paths)
    if len(seed_preds) == 2:
        return np.asarray(seed_preds[0]), np.asarray(seed_preds[1]), None
    if len(seed_preds) == 3:
        return np.asarray(seed_preds[0]), np.asarray(seed_preds[1]), list(seed_preds[2])
    raise ValueError("each seed's predictions must be (labels, predictions[, ids]) or a RunPredictions")


def compare_runs(headline: Sequence[SeedPredictions], others: Mapping[str, Sequence[SeedPredictions]],
                 n_boot: int = 10000, seed: int = 0, level: float = 0.95, alpha: float = 0.05) -> dict[str, Comparison]:
    """Compare the headline method with each other method, seed by seed on the same test images.

    ``headline`` and every entry of ``others`` list one item per seed, in the same seed order.
    When both sides carry image ids (paths), the other side is aligned to the headline's order by
    id and the bootstrap resamples images (an image's predictions under all seeds together);
    otherwise the items must be in the same order and every pooled prediction is its own unit.
    """
    if not headline:
        raise ValueError("no headline predictions")
    mine = [_as_triple(s) for s in headline]
    results = {}
    for name, runs in others.items():
        if len(runs) != len(mine):
            raise ValueError(f"{name}: {len(runs)} seeds, the headline method has {len(mine)}")
        correct_a, correct_b, ids, acc_a, acc_b = [], [], [], [], []
        for s, ((labels, pred_a, ids_a), mine_raw, other) in enumerate(zip(mine, headline, runs)):
            if isinstance(mine_raw, RunPredictions) and isinstance(other, RunPredictions) \
                    and mine_raw.classes != other.classes:
                raise ValueError(f"{name}, seed #{s}: classes {other.classes} are not in the headline's order "
                                 f"{mine_raw.classes}; read both with the same classes")
            labels_b, pred_b, ids_b = _as_triple(other)
            if ids_a is not None and ids_b is not None:
                if sorted(ids_a) != sorted(ids_b) or len(set(ids_a)) != len(ids_a):
                    raise ValueError(f"{name}, seed #{s}: not the headline's test images")
                position = {k: i for i, k in enumerate(ids_b)}
                take = np.array([position[k] for k in ids_a])
                labels_b, pred_b = labels_b[take], pred_b[take]
            if labels.shape != labels_b.shape or not np.array_equal(labels, labels_b):
                raise ValueError(f"{name}, seed #{s}: labels differ from the headline's, so the test images "
                                 "are not aligned")
            correct_a.append(pred_a == labels)
            correct_b.append(pred_b == labels)
            acc_a.append(float(correct_a[-1].mean()))
            acc_b.append(float(correct_b[-1].mean()))
            ids.append(ids_a if ids_a is not None and ids_b is not None else None)
        a, b = np.concatenate(correct_a), np.concatenate(correct_b)
        groups = [k for seed_ids in ids for k in seed_ids] if all(i is not None for i in ids) else None
        diff = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed, level=level, groups=groups)
        p = mcnemar_exact(a, b)
        results[name] = Comparison(diff, p, verdict(diff.ci, p, alpha), mean_std(acc_a), mean_std(acc_b),
                                   tuple(len(c) for c in correct_a),
                                   len(set(groups)) if groups is not None else len(a))
    return results
