"""Each plot function draws the data it is given (read back from the saved figure's artists) and
writes a real PNG and SVG; the weights plot writes nothing without weights."""

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from hclafter.reporting import plots
from hclafter.reporting.plots import (plot_confusion, plot_curves, plot_examples, plot_learned_weights, plot_stage_class_accuracy,
                                      plot_stage_weights, plot_wheel_means, save_figure, stage_label, weight_matrix)

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


@pytest.fixture
def figures(monkeypatch) -> dict:
    """The figures the plot functions save, by file name (still written to disk)."""
    saved = {}

    def save(fig, path, tight=True):
        saved[Path(path).name] = fig
        save_figure(fig, path, tight)
    monkeypatch.setattr(plots, "save_figure", save)
    return saved


def panels(fig) -> dict:
    """The figure's visible titled axes, by title."""
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}


def series(ax) -> dict[str, tuple[list, list]]:
    """The axes' labelled lines: label → (x, y)."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
            if not line.get_label().startswith("_")}


def unlabelled_x(ax) -> list[tuple]:
    """x of the axes' unlabelled lines (phase boundaries, the selected epoch)."""
    return [tuple(line.get_xdata()) for line in ax.lines if line.get_label().startswith("_")]


def assert_png(path: Path) -> None:
    """A PNG, and the same figure as a well-formed SVG beside it."""
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE)
    assert data.startswith(PNG_SIGNATURE)
    svg = ElementTree.parse(path.with_suffix(".svg")).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"


def test_plot_curves_skips_missing_keys(tmp_path: Path, figures) -> None:
    path = tmp_path / "curves.png"
    plot_curves(RECORDS, path, best_epoch=2)
    assert_png(path)
    loss, accuracy = panels(figures["curves.png"]).values()
    selected = {"selected (epoch 2)": ([2, 2], [0, 1])}
    # a key missing from a record is skipped there (not drawn as 0); val_loss is missing throughout
    assert series(loss) == {"train loss": ([1, 2], [1.9, 1.5]), "train task loss": ([1, 2], [1.8, 1.3]),
                            "train consistency loss": ([2], [0.2]), **selected}
    assert series(accuracy) == {"train accuracy": ([1, 2], [0.35, 0.5]), "val accuracy": ([1, 2], [0.4, 0.45]),
                                "val macro-F1": ([2], [0.3]), **selected}
    for ax in (loss, accuracy):
        assert unlabelled_x(ax) == [(1.5, 1.5)]  # the boundary between phases 1 and 2
        assert [t.get_text() for t in ax.texts] == ["phase 1", "phase 2"]
    assert accuracy.get_ylim() == (0, 1)


def test_plot_confusion_counts_and_rates(tmp_path: Path, figures) -> None:
    path = tmp_path / "cm.png"
    # Last row is empty: normalisation must not divide by zero.
    plot_confusion([[3, 1, 0], [0, 2, 0], [0, 0, 0]], ["a", "b", "c"], path, "test split (6 images)")
    assert_png(path)
    fig = figures["cm.png"]
    counts, rates = panels(fig)["images"], panels(fig)["row-normalised (recall)"]
    np.testing.assert_array_equal(counts.images[0].get_array(), [[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    np.testing.assert_array_equal(rates.images[0].get_array(), [[0.75, 0.25, 0], [0, 1, 0], [0, 0, 0]])
    assert [t.get_text() for t in counts.texts] == ["3", "1", "0", "0", "2", "0", "0", "0", "0"]
    assert [t.get_text() for t in rates.texts] == ["0.75", "0.25", "0.00", "0.00", "1.00", "0.00", "0.00", "0.00", "0.00"]
    assert [t.get_text() for t in counts.get_yticklabels()] == ["a", "b", "c"]
    assert "Confusion matrix: test split (6 images)" in [t.get_text() for t in fig.texts]


def test_stages_are_numbered_from_one_with_their_blocks() -> None:
    assert stage_label(1, [5, 6, 7]) == "stage 1 (blocks 5–7)"
    assert stage_label(2, [8, 10]) == "stage 2 (blocks 8, 10)"
    assert stage_label(3, [12]) == "stage 3 (block 12)"
    assert stage_label(4) == "stage 4"


def test_plot_stage_weights_with_blocks(tmp_path: Path, figures) -> None:
    path = tmp_path / "weights.png"
    plot_stage_weights(RECORDS, path, stages=[[3, 5, 7], [9, 11], [3, 5, 7]], best_epoch=1)
    assert_png(path)
    drawn = panels(figures["weights.png"])
    assert {title: series(ax) for title, ax in drawn.items()} == {
        "NGA weights, stage 1 (blocks 3, 5, 7)": {"block 3": ([1, 2], [0.0148, 0.1]), "block 5": ([1, 2], [0.1797, 0.2]),
                                                  "block 7": ([1, 2], [0.8055, 0.7])},
        "NGA weights, stage 2 (blocks 9, 11)": {"block 9": ([1, 2], [0.18, 0.3]), "block 11": ([1, 2], [0.82, 0.7])},
        "NGA weights, stage 3 (blocks 3, 5, 7)": {"block 3": ([1, 2], [0.0148, 0.2]), "block 5": ([1, 2], [0.1797, 0.2]),
                                                  "block 7": ([1, 2], [0.8055, 0.6])},
        "Stage fusion weights": {"stage 1 (blocks 3, 5, 7)": ([1, 2], [0.33, 0.2]),
                                 "stage 2 (blocks 9, 11)": ([1, 2], [0.33, 0.3]),
                                 "stage 3 (blocks 3, 5, 7)": ([1, 2], [0.34, 0.5])}}
    assert all(unlabelled_x(ax) == [(1, 1)] and ax.get_ylim() == (0, 1) for ax in drawn.values())  # epoch 1 selected


def test_distribution_and_stage_figures(tmp_path: Path, figures) -> None:
    classes = ["a", "b", "c", "d"]
    target, predicted = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.25, 0.25, 0.25, 0.25])
    closed = lambda d: list(d) + [d[0]]  # a wheel's line returns to its first class
    plot_wheel_means(classes, target, predicted, np.stack([predicted, target]), tmp_path / "wheel.png",
                     ["stage 1", "stage 2"])
    assert_png(tmp_path / "wheel.png")
    wheels = {title: {name: y for name, (_, y) in series(ax).items()}
              for title, ax in panels(figures["wheel.png"]).items()}
    assert wheels == {"Mean distribution: target vs predicted": {"target": closed(target),
                                                                 "predicted (fused)": closed(predicted)},
                      "Mean distribution of each stage": {"target": closed(target), "stage 1": closed(predicted),
                                                          "stage 2": closed(target)}}
    plot_stage_class_accuracy({"stage 1": [0.1, 0.2, 0.3, 0.4], "fused": [0.5, 0.5, 0.5, 0.5]}, classes,
                              tmp_path / "stages.png")
    assert_png(tmp_path / "stages.png")
    (bars,) = panels(figures["stages.png"]).values()
    assert {c.get_label(): [p.get_height() for p in c] for c in bars.containers} == {
        "stage 1": [0.1, 0.2, 0.3, 0.4], "fused": [0.5, 0.5, 0.5, 0.5]}
    assert [t.get_text() for t in bars.get_xticklabels()] == classes
    examples = [{"group": "most confident correct", "image": str(tmp_path / "missing.png"), "title": "a (0.40)",
                 "predicted": predicted, "target": target}]
    plot_examples(examples, classes, tmp_path / "examples.png")
    assert_png(tmp_path / "examples.png")
    image_ax, wheel_ax = figures["examples.png"].axes
    assert image_ax.get_title() == "a (0.40)" and "image not found" in [t.get_text() for t in image_ax.texts]
    assert {name: y for name, (_, y) in series(wheel_ax).items()} == {"predicted": closed(predicted),
                                                                      "target": closed(target)}
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
    heat = panels(figures["learned.png"])
    np.testing.assert_array_equal(np.ma.filled(heat["NGA weight per block"].images[0].get_array(), np.nan), nga)
    np.testing.assert_array_equal(np.ma.filled(heat["fusion weight per stage"].images[0].get_array(), np.nan),
                                  fusion)
    assert [t.get_text() for t in heat["NGA weight per block"].get_yticklabels()] == names
    assert [t.get_text() for t in heat["fusion weight per stage"].texts] == ["0.20", "0.30", "0.50", "1.00"]


def test_plot_stage_weights_fusion_only(tmp_path: Path, figures) -> None:
    path = tmp_path / "fusion.png"
    records = [{k: v for k, v in r.items() if k != "nga_weights"} for r in RECORDS]
    plot_stage_weights(records, path)
    assert_png(path)
    assert {title: series(ax) for title, ax in panels(figures["fusion.png"]).items()} == {
        "Stage fusion weights": {"stage 1": ([1, 2], [0.33, 0.2]), "stage 2": ([1, 2], [0.33, 0.3]),
                                 "stage 3": ([1, 2], [0.34, 0.5])}}


def test_plot_stage_weights_without_weights_writes_nothing(tmp_path: Path, figures) -> None:
    path = tmp_path / "none.png"
    records = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.8}]
    plot_stage_weights(records, path)
    assert not path.exists() and not figures
