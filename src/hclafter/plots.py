"""PNG figures for training runs: learning curves, confusion matrices and NGA/fusion weights.

Uses the Agg backend so plotting works on headless training machines.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .files import atomic_write_bytes  # noqa: E402

ACCURACY_KEYS = ("train_accuracy", "val_accuracy", "val_macro_f1")


def save_figure(fig: Figure, path: Path) -> None:
    """Write the figure as PNG, atomically (a kill leaves the old file or the new one), and close it
    so long runs do not accumulate open figures."""
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), png.getvalue())


def _plot_key(ax: Axes, records: list[dict], key: str) -> None:
    """Plot one scalar key vs epoch, skipping records where it is missing."""
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    if points:
        epochs, values = zip(*points)
        ax.plot(epochs, values, marker="o", markersize=3, label=key)


def plot_curves(records: list[dict], path: Path) -> None:
    """Loss panel (every ``train_*loss`` key) and accuracy/F1 panel vs epoch."""
    loss_keys = list(
        dict.fromkeys(
            k for r in records for k in r if k.startswith("train_") and k.endswith("loss")
        )
    )
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys:
        _plot_key(loss_ax, records, key)
    for key in ACCURACY_KEYS:
        _plot_key(acc_ax, records, key)
    for ax, title in ((loss_ax, "Loss"), (acc_ax, "Accuracy / macro-F1")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_confusion(
    cm: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: Path,
    normalize: bool = True,
) -> None:
    """Confusion heat map (rows = true class); ``normalize`` shows per-class recall rates."""
    matrix = np.asarray(cm, dtype=np.float64)
    if normalize:
        row_sums = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = matrix.max() / 2 if matrix.size else 0.0
    for i in range(n):
        for j in range(n):
            text = f"{matrix[i, j]:.2f}" if normalize else str(int(matrix[i, j]))
            color = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    save_figure(fig, path)


def _nested(value: object, index: Sequence[int]) -> float | None:
    """``value[i][j]...`` or None when any level is missing (records may differ in shape)."""
    for i in index:
        if not isinstance(value, Sequence) or i >= len(value):
            return None
        value = value[i]
    return float(value)


def _plot_weight_series(
    ax: Axes, records: list[dict], key: str, index: Sequence[int], label: str
) -> None:
    """Plot ``record[key][index...]`` vs epoch for the records that have that entry."""
    points = [
        (r["epoch"], v) for r in records if (v := _nested(r.get(key), index)) is not None
    ]
    if points:
        epochs, values = zip(*points)
        ax.plot(epochs, values, marker="o", markersize=3, label=label)


def plot_stage_weights(
    records: list[dict],
    path: Path,
    layer_names: list[list[str]] | None = None,
) -> None:
    """One panel per stage with its NGA layer weights, plus one with the stage fusion weights.

    Shows how the learned layer selection and stage fusion evolve; writes nothing when the
    records carry neither kind of weight (e.g. a model without NGA or fusion).
    """
    nga = [r["nga_weights"] for r in records if r.get("nga_weights") is not None]
    fusion = [r["fusion_weights"] for r in records if r.get("fusion_weights") is not None]
    if not nga and not fusion:
        return
    layers_per_stage = [
        max((len(w[s]) for w in nga if s < len(w)), default=0)
        for s in range(max((len(w) for w in nga), default=0))
    ]
    num_panels = len(layers_per_stage) + bool(fusion)
    fig, axes = plt.subplots(1, num_panels, figsize=(4 * num_panels, 3.5), squeeze=False)
    for s, num_layers in enumerate(layers_per_stage):
        ax = axes[0, s]
        for k in range(num_layers):
            label = layer_names[s][k] if layer_names is not None else f"k={k}"
            _plot_weight_series(ax, records, "nga_weights", (s, k), label)
        ax.set_title(f"NGA weights, stage {s}")
    if fusion:
        ax = axes[0, -1]
        for s in range(max(len(w) for w in fusion)):
            _plot_weight_series(ax, records, "fusion_weights", (s,), f"stage {s}")
        ax.set_title("Fusion weights")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_method_bars(rows: list[dict], key: str, path: Path, ylabel: str) -> None:
    """Mean ± std of ``key`` per method (one bar group per dataset), from sweep result rows."""
    if not rows:
        return
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(methods) * len(datasets) + 2), 4))
    width = 0.8 / len(datasets)
    for d, dataset in enumerate(datasets):
        by_method = {r["method"]: r for r in rows if r["dataset"] == dataset}
        xs = [m + d * width for m in range(len(methods)) if methods[m] in by_method]
        means = [by_method[m][f"{key}_mean"] for m in methods if m in by_method]
        stds = [by_method[m][f"{key}_std"] for m in methods if m in by_method]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=dataset)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(methods))])
    ax.set_xticklabels(methods, rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if len(datasets) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_overlaid_curves(curves: dict[str, list[dict]], key: str, path: Path) -> None:
    """One line per method: ``key`` against epoch (e.g. the training loss of each method's first seed)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, records in curves.items():
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_learned_weights(weights: dict[str, dict], path: Path) -> None:
    """Final NGA weights per stage and fusion weights of each run that has them, as bar charts."""
    runs = {name: w for name, w in weights.items() if w.get("nga_weights") or w.get("fusion_weights")}
    if not runs:
        return
    fig, axes = plt.subplots(len(runs), 2, figsize=(9, 2.4 * len(runs)), squeeze=False)
    for (name, w), (ax_nga, ax_fusion) in zip(runs.items(), axes):
        labels, values = [], []
        for s, stage in enumerate(w.get("nga_weights") or []):
            labels += [f"s{s + 1}.{k}" for k in range(len(stage))]
            values += stage
        ax_nga.bar(range(len(values)), values)
        ax_nga.set_xticks(range(len(values)))
        ax_nga.set_xticklabels(labels, fontsize=7, rotation=90)
        ax_nga.set_title(f"{name}: NGA weights", fontsize=9)
        fusion = w.get("fusion_weights") or []
        ax_fusion.bar(range(len(fusion)), fusion)
        ax_fusion.set_xticks(range(len(fusion)))
        ax_fusion.set_xticklabels([f"stage {s + 1}" for s in range(len(fusion))], fontsize=7)
        ax_fusion.set_title(f"{name}: fusion weights", fontsize=9)
    save_figure(fig, path)
