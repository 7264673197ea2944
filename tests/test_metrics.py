"""Metric values checked against hand computations (shown in comments)."""

import json
import math

import numpy as np
import pytest

from hclafter.core.metrics import (
                                   classification_metrics,
                                   ldl_metrics,
                                   polarity_accuracy,
                                   stage_accuracies,
                                   )

NAMES = ["amusement", "anger", "sadness"]
# Class 2 ("sadness") is never predicted.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 0, 0])


def test_classification_metrics_hand_computed() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    # Correct at indices 0, 2, 3 -> 3/6.
    assert m["accuracy"] == pytest.approx(0.5)
    # Rows = true, columns = predicted.
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    # Class 0: TP=1, predicted 3 times, support 2 -> P=1/3, R=1/2, F1=2*(1/6)/(5/6)=2/5.
    # Class 1: TP=2, predicted 3 times, support 2 -> P=2/3, R=1,   F1=2*(2/3)/(5/3)=4/5.
    # Class 2: never predicted -> P=R=F1=0 (zero_division=0).
    pc = m["per_class"]
    assert pc["amusement"] == pytest.approx(
        {"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2}
    )
    assert pc["anger"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert pc["sadness"] == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    )
    # Macro-F1 = (0.4 + 0.8 + 0) / 3 = 0.4.
    assert m["macro_f1"] == pytest.approx(0.4)
    json.dumps(m)  # results must be JSON-serialisable as-is


def test_classification_metrics_class_absent_everywhere() -> None:
    # Class 2 appears in neither y_true nor y_pred: it keeps its row/column, but macro-F1
    # averages over the 2 classes present, (1 + 1) / 2, not (1 + 1 + 0) / 3.
    m = classification_metrics(np.array([0, 1]), np.array([0, 1]), NAMES)
    assert m["accuracy"] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert m["macro_f1"] == pytest.approx(1.0) and m["macro_f1_classes"] == 2
    assert m["per_class"]["sadness"]["support"] == 0


def test_polarity_accuracy_forgives_within_polarity_confusions() -> None:
    polarity = [1, 0, 0]  # amusement positive; anger, sadness negative
    y_pred = np.array([0, 1, 2, 1, 1, 0])
    # true polarity [1,1,0,0,0,0], pred polarity [1,0,0,0,0,1] -> match at 0,2,3,4 -> 4/6,
    # although class accuracy is only 2/6 (indices 0 and 3).
    assert polarity_accuracy(Y_TRUE, y_pred, polarity) == pytest.approx(2 / 3)


# pred p = [0.5, 0.5, 0], target q = [1, 0, 0]
#   |p-q| = [0.5, 0.5, 0], p+q = [1.5, 0.5, 0]
#   chebyshev = 0.5
#   clark = sqrt(0.25/2.25 + 0.25/0.25 + 0) = sqrt(1/9 + 1) = sqrt(10)/3
#   canberra = 0.5/1.5 + 0.5/0.5 + 0 = 4/3
#   kl = 1*log(1/0.5) = log 2
#   cosine = 0.5 / (sqrt(0.5) * 1) = sqrt(0.5)
#   intersection = 0.5 + 0 + 0 = 0.5
PAIR_A = (
    [0.5, 0.5, 0.0],
    [1.0, 0.0, 0.0],
    {
        "chebyshev": 0.5,
        "clark": math.sqrt(10) / 3,
        "canberra": 4 / 3,
        "kl": math.log(2),
        "cosine": math.sqrt(0.5),
        "intersection": 0.5,
    },
)
# pred p = [0.2, 0.3, 0.5], target q = [0.4, 0.4, 0.2]
#   |p-q| = [0.2, 0.1, 0.3], p+q = [0.6, 0.7, 0.7]
#   chebyshev = 0.3
#   clark = sqrt(0.04/0.36 + 0.01/0.49 + 0.09/0.49) = sqrt(1/9 + 10/49) = sqrt(139/441)
#   canberra = 0.2/0.6 + 0.1/0.7 + 0.3/0.7 = 1/3 + 4/7 = 19/21
#   kl = 0.4*log(0.4/0.2) + 0.4*log(0.4/0.3) + 0.2*log(0.2/0.5)
#   cosine = (0.08+0.12+0.10) / (sqrt(0.38) * sqrt(0.36)) = 0.5 / sqrt(0.38)
#   intersection = 0.2 + 0.3 + 0.2 = 0.7
PAIR_B = (
    [0.2, 0.3, 0.5],
    [0.4, 0.4, 0.2],
    {
        "chebyshev": 0.3,
        "clark": math.sqrt(139 / 441),
        "canberra": 19 / 21,
        "kl": 0.4 * math.log(2) + 0.4 * math.log(4 / 3) + 0.2 * math.log(0.4),
        "cosine": 0.5 / math.sqrt(0.38),
        "intersection": 0.7,
    },
)


@pytest.mark.parametrize(("pred", "target", "expected"), [PAIR_A, PAIR_B])
def test_ldl_metrics_hand_computed(pred: list, target: list, expected: dict) -> None:
    assert ldl_metrics(np.array([pred]), np.array([target])) == pytest.approx(expected)


def test_ldl_metrics_average_over_samples() -> None:
    pred = np.array([PAIR_A[0], PAIR_B[0]])
    target = np.array([PAIR_A[1], PAIR_B[1]])
    expected = {k: (PAIR_A[2][k] + PAIR_B[2][k]) / 2 for k in PAIR_A[2]}
    assert ldl_metrics(pred, target) == pytest.approx(expected)


def test_ldl_metrics_identical_distributions() -> None:
    p = np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    m = ldl_metrics(p, p.copy())
    assert m == pytest.approx(
        {"chebyshev": 0, "clark": 0, "canberra": 0, "kl": 0, "cosine": 1, "intersection": 1}
    )


def test_ldl_kl_clamps_zero_prediction() -> None:
    # q = [1, 0], p = [0, 1]: KL = 1*log(1/eps) = 12*log(10) for eps=1e-12, finite.
    m = ldl_metrics(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))
    assert m["kl"] == pytest.approx(12 * math.log(10))


@pytest.mark.parametrize(
    ("pred_shape", "target_shape"), [((3,), (3,)), ((2, 3), (2, 4)), ((1, 2, 3), (1, 2, 3))]
)
def test_ldl_metrics_rejects_bad_shapes(pred_shape: tuple, target_shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"2-D arrays of the same shape \[N, C\]"):
        ldl_metrics(np.zeros(pred_shape), np.zeros(target_shape))


def test_stage_accuracies() -> None:
    y = np.array([0, 1, 1])
    stage_logits = np.array(
        [
            [[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]],  # argmax [0, 1, 0] -> 2/3
            [[5.0, 0.0], [0.0, 5.0], [0.0, 5.0]],  # argmax [0, 1, 1] -> 1
        ]
    )
    assert stage_accuracies(stage_logits, y) == pytest.approx([2 / 3, 1.0])


def test_stage_accuracies_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\[S, N, C\]"):
        stage_accuracies(np.zeros((3, 2)), np.array([0, 1, 1]))
