"""Each plot function writes a real PNG; the weights plot writes nothing without weights."""

from pathlib import Path

import pytest

from hclafter.plots import plot_confusion, plot_curves, plot_stage_weights

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
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE)
    assert data.startswith(PNG_SIGNATURE)


def test_plot_curves_skips_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    plot_curves(RECORDS, path)
    assert_png(path)


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion(tmp_path: Path, normalize: bool) -> None:
    path = tmp_path / "cm.png"
    # Last row is empty: normalisation must not divide by zero.
    plot_confusion([[3, 1, 0], [0, 2, 0], [0, 0, 0]], ["a", "b", "c"], path, normalize)
    assert_png(path)


def test_plot_stage_weights_with_layer_names(tmp_path: Path) -> None:
    path = tmp_path / "weights.png"
    names = [["L3", "L5", "L7"], ["L9", "L11"], ["L3", "L5", "L7"]]
    plot_stage_weights(RECORDS, path, layer_names=names)
    assert_png(path)


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
