"""Evaluation metrics for single-label emotion classification and label distribution learning.

All results are plain Python floats / ints / lists so they can be written straight to JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

# The scalar metrics every table and log line reports.
HEADLINE = ("accuracy", "macro_f1", "polarity_accuracy")


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> dict:
    """Accuracy, macro-F1, per-class scores and confusion matrix.

    Per-class scores and the confusion matrix cover every class (pinned to
    ``range(len(class_names))``). Macro-F1 averages over the classes present in ``y_true`` only:
    a class without a single image has no F1 to measure, and averaging in a 0 for it would
    lower the score for a gap in the data; ``macro_f1_classes`` says how many classes it covers.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    present = support > 0
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "macro_f1_classes": int(present.sum()),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
    }


def polarity_accuracy(y_true: np.ndarray, y_pred: np.ndarray, polarity: Sequence[int]) -> float:
    """Accuracy at the positive/negative level: confusions within a polarity are forgiven."""
    pol = np.asarray(polarity)
    return float(np.mean(pol[np.asarray(y_true)] == pol[np.asarray(y_pred)]))


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den with 0 where den == 0 (both distributions are 0 there)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def ldl_metrics(pred: np.ndarray, target: np.ndarray, eps: float = 1e-12) -> dict:
    """Standard label-distribution-learning distances/similarities, averaged over samples.

    ``pred`` and ``target`` are [N, C] distributions; KL is KL(target || pred) with ``pred``
    clamped to ``eps`` so a confident wrong prediction gives a large but finite value.
    """
    p = np.asarray(pred, dtype=np.float64)
    q = np.asarray(target, dtype=np.float64)
    if p.ndim != 2 or p.shape != q.shape:
        raise ValueError(
            "pred and target must be 2-D arrays of the same shape [N, C], "
            f"got {p.shape} and {q.shape}"
        )
    diff = np.abs(p - q)
    total = p + q
    # q == 0 terms become 0 * finite = 0 rather than 0 * log(0) = nan.
    log_ratio = np.log(np.where(q > 0, q, 1.0) / np.maximum(p, eps))
    norms = np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1)
    return {
        "chebyshev": float(np.mean(diff.max(axis=1))),
        "clark": float(np.mean(np.sqrt(_safe_ratio(diff**2, total**2).sum(axis=1)))),
        "canberra": float(np.mean(_safe_ratio(diff, total).sum(axis=1))),
        "kl": float(np.mean(np.sum(q * log_ratio, axis=1))),
        "cosine": float(np.mean(np.sum(p * q, axis=1) / np.maximum(norms, eps))),
        "intersection": float(np.mean(np.minimum(p, q).sum(axis=1))),
    }


def stage_accuracies(stage_logits: np.ndarray, y_true: np.ndarray) -> list[float]:
    """Accuracy of each stage's own head from [S, N, C] logits, to see where accuracy is gained."""
    logits, y_true = np.asarray(stage_logits), np.asarray(y_true)
    if logits.ndim != 3 or logits.shape[1] != len(y_true):
        raise ValueError(
            f"stage_logits must have shape [S, N, C] with N = len(y_true) = {len(y_true)}, "
            f"got {logits.shape}"
        )
    return [float(acc) for acc in np.mean(logits.argmax(axis=-1) == y_true[None, :], axis=1)]


# The convergence verdict (SPEC §11): a run is still improving when the best validation accuracy of
# its last LAST_FRACTION of steps beats the best before them by more than MIN_RISE.
CONVERGED, STILL_IMPROVING = "converged", "still improving"
LAST_FRACTION, MIN_RISE = Fraction(1, 5), 0.005


def convergence(curve: Sequence[tuple[int, float]], total_steps: int) -> dict:
    """The verdict on a validation curve of (optimizer steps done, accuracy) points: ``still
    improving`` when the best accuracy at the points after 80 % of ``total_steps`` exceeds the best
    at the points up to 80 % by more than 0.5 points, or when no point lies before the last 20 % (a
    single validation cannot show a plateau); ``converged`` otherwise. The best values are those
    checkpoint selection sees, so a "still improving" run's selected checkpoint is a late one."""
    start = (1 - LAST_FRACTION) * total_steps  # exact: a point at 80 % of the steps is not in the last 20 %
    late = [acc for step, acc in curve if step > start]
    early = [acc for step, acc in curve if step <= start]
    if not late:
        raise ValueError(f"no validation after step {float(start):g} of {total_steps}")
    rise = max(late) - max(early) if early else None
    improving = rise is None or rise > MIN_RISE + 1e-9  # 1e-9: k/n accuracies subtract with rounding error
    return {"verdict": STILL_IMPROVING if improving else CONVERGED, "last_steps_after": float(start),
            "best_val_accuracy_before": max(early) if early else None, "best_val_accuracy_last": max(late),
            "rise": rise, "validations": len(curve)}
