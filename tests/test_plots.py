"""Each plot function writes a real PNG and SVG; the weights plot writes nothing without weights."""

from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from hclafter.reporting.plots import (plot_confusion, plot_curves, plot_examples, plot_learned_weights, plot_stage_class_accuracy,
                                      plot_stage_weights, plot_wheel_means, stage_label, weight_matrix)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NGA = [[0.0148, 0.1797, 0.8055], [0.18, 0.82], [0.0148, 0.1797, 0.8055]]
RECORDS = [
    {
        "epoch": 1,
        "phase": 1,
        "train_loss": 1.9,
        "train_task_loss": 1.8,
        "train_accuracy": 0.35,
        "val_accuracy": 0.4,
        "nga_weights": NGA,
        "fusion_weights": [0.33, 0.33, 0.34],
    },
    {
        "epoch": 2,
        "phase": 2,
        "train_loss": 1.5,
        "train_task_loss": 1.3,
        "train_consistency_loss": 0.2,
        "train_accuracy": 0.5,
        "val_accuracy": 0.45,
        "val_macro_f1": 0.3,
        "nga_weights": [[0.1, 0.2, 0.7], [0.3, 0.7], [0.2, 0.2, 0.6]],
        "fusion_weights": [0.2, 0.3, 0.5],
    },
]


def assert_png(path: Path) -> None:
    """A PNG, and the same figure as a well-formed SVG beside it."""
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE)
    assert data.startswith(PNG_SIGNATURE)
    svg = ElementTree.parse(path.with_suffix(".svg")).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"


def test_plot_curves_skips_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    plot_curves(RECORDS, path, best_epoch=2)
    assert_png(path)


def test_plot_confusion_counts_and_rates(tmp_path: Path) -> None:
    path = tmp_path / "cm.png"
    # Last row is empty: normalisation must not divide by zero.
    plot_confusion([[3, 1, 0], [0, 2, 0], [0, 0, 0]], ["a", "b", "c"], path, "test split (6 images)")
    assert_png(path)


def test_stages_are_numbered_from_one_with_their_blocks() -> None:
    assert stage_label(1, [5, 6, 7]) == "stage 1 (blocks 5–7)"
    assert stage_label(2, [8, 10]) == "stage 2 (blocks 8, 10)"
    assert stage_label(3, [12]) == "stage 3 (block 12)"
    assert stage_label(4) == "stage 4"


def test_plot_stage_weights_with_blocks(tmp_path: Path) -> None:
    path = tmp_path / "weights.png"
    plot_stage_weights(RECORDS, path, stages=[[3, 5, 7], [9, 11], [3, 5, 7]], best_epoch=1)
    assert_png(path)


def test_distribution_and_stage_figures(tmp_path: Path) -> None:
    classes = ["a", "b", "c", "d"]
    target, predicted = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.25, 0.25, 0.25, 0.25])
    plot_wheel_means(classes, target, predicted, np.stack([predicted, target]), tmp_path / "wheel.png",
                     ["stage 1", "stage 2"])
    assert_png(tmp_path / "wheel.png")
    plot_stage_class_accuracy({"stage 1": [0.1, 0.2, 0.3, 0.4], "fused": [0.5, 0.5, 0.5, 0.5]}, classes,
                              tmp_path / "stages.png")
    assert_png(tmp_path / "stages.png")
    examples = [{"group": "most confident correct", "image": str(tmp_path / "missing.png"), "title": "a (0.40)",
                 "predicted": predicted, "target": target}]
    plot_examples(examples, classes, tmp_path / "examples.png")
    assert_png(tmp_path / "examples.png")
    weights = {"hybrid": {"nga_weights": NGA, "fusion_weights": [0.2, 0.3, 0.5],
                          "stages": [[5, 6, 7], [8, 9], [10, 11, 12]]},
               "zeroshot": {},
               "lafter": {"nga_weights": [[1.0]], "fusion_weights": [1.0], "stages": [[12]]}}
    plot_learned_weights(weights, tmp_path / "learned.png")
    assert_png(tmp_path / "learned.png")
    names, blocks, nga, fusion = weight_matrix(weights)
    assert names == ["hybrid", "lafter"] and blocks == list(range(5, 13))
    assert nga[0].tolist() == [w for stage in NGA for w in stage] and nga[1, -1] == 1.0
    assert np.isnan(nga[1, :-1]).all() and fusion[1, 0] == 1.0 and np.isnan(fusion[1, 1:]).all()


def test_plot_stage_weights_fusion_only(tmp_path: Path) -> None:
    path = tmp_path / "fusion.png"
    records = [{k: v for k, v in r.items() if k != "nga_weights"} for r in RECORDS]
    plot_stage_weights(records, path)
    assert_png(path)


def test_plot_stage_weights_without_weights_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none.png"
    records = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.8}]
    plot_stage_weights(records, path)
    assert not path.exists()
