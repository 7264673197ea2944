"""Figures of runs and sweeps, written as PNG and SVG side by side.

Every figure is at most 10 inches wide with text of at least 9 points, so it stays legible when a
report shows it at its column width (about 1000 pixels); weights and accuracies use a 0–1 axis so
that figures can be compared; stages are numbered 1..S and named with the blocks they hold.
Uses the Agg backend so plotting works on headless training machines.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from ..core.files import atomic_write_bytes  # noqa: E402

WIDTH = 10.0  # inches: the report's column at 100 dpi
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9, "xtick.labelsize": 9,
                     "ytick.labelsize": 9, "svg.hashsalt": "hclafter", "svg.fonttype": "path"})
FUSED_COLOR = "black"


def save_figure(fig: Figure, path: Path, tight: bool = True) -> None:
    """Write the figure as ``path`` (PNG) and the same name with ``.svg``, each atomically (a kill
    leaves the old file or the new one), then close it so long runs do not accumulate open figures.
    ``tight=False`` keeps a layout the caller made (e.g. room left for a figure legend)."""
    path = Path(path)
    if tight:
        fig.tight_layout()
    for suffix, options in ((".png", {"dpi": 120}), (".svg", {"metadata": {"Date": None}})):
        data = io.BytesIO()
        fig.savefig(data, format=suffix[1:], **options)
        atomic_write_bytes(path.with_suffix(suffix), data.getvalue())
    plt.close(fig)


def stage_label(stage: int, blocks: Sequence[int] | None = None) -> str:
    """"stage 2 (blocks 8–9)": stages count from 1 everywhere, with the image blocks each reads."""
    if not blocks:
        return f"stage {stage}"
    blocks = list(blocks)
    if len(blocks) == 1:
        return f"stage {stage} (block {blocks[0]})"
    consecutive = blocks == list(range(blocks[0], blocks[-1] + 1))
    names = f"{blocks[0]}–{blocks[-1]}" if consecutive else ", ".join(map(str, blocks))
    return f"stage {stage} (blocks {names})"


def _stage_colors(n: int) -> list:
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.1, 0.85, max(n, 1))]


def _epoch_axis(ax: Axes) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _plot_key(ax: Axes, records: list[dict], key: str, label: str, **style) -> None:
    """Plot one scalar key vs epoch, skipping records where it is missing."""
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    if points:
        epochs, values = zip(*points)
        ax.plot(epochs, values, marker="o", markersize=3, label=label, **style)


def _mark_phases_and_selection(ax: Axes, records: list[dict], best_epoch: Optional[int]) -> None:
    """Dashed lines between training phases (labelled at the top) and the selected epoch."""
    phases = [(r["epoch"], r["phase"]) for r in records if "phase" in r]
    for (_, previous), (epoch, phase) in zip(phases, phases[1:]):
        if phase != previous:
            ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=1)
    spans: dict[int, list[int]] = {}
    for epoch, phase in phases:
        spans.setdefault(phase, []).append(epoch)
    if len(spans) > 1:
        for phase, epochs in spans.items():
            ax.annotate(f"phase {phase}", ((epochs[0] + epochs[-1]) / 2, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -3), textcoords="offset points", ha="center", va="top", fontsize=9,
                        color="dimgrey", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    if best_epoch:
        ax.axvline(best_epoch, color="tab:red", linewidth=1.5, alpha=0.6, label=f"selected (epoch {best_epoch})")


def plot_curves(records: list[dict], path: Path, best_epoch: Optional[int] = None) -> None:
    """Losses (train total, task and consistency; validation task loss) and accuracies (train, val,
    val macro-F1 on 0–1) against epoch, with the phase boundaries and the epoch selected on val."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(WIDTH, 4.2))
    for key, label, style in (("train_loss", "train loss", {}), ("train_task_loss", "train task loss",
                                                                 {"linestyle": ":"}),
                              ("train_consistency_loss", "train consistency loss", {"linestyle": "-."}),
                              ("val_loss", "val task loss", {"color": "tab:orange"})):
        if any(r.get(key) for r in records):  # a loss that is 0 throughout (consistency off) adds nothing
            _plot_key(loss_ax, records, key, label, **style)
    for key, label in (("train_accuracy", "train accuracy"), ("val_accuracy", "val accuracy"),
                       ("val_macro_f1", "val macro-F1")):
        _plot_key(acc_ax, records, key, label)
    acc_ax.set_ylim(0, 1)
    for ax, title in ((loss_ax, "Loss"), (acc_ax, "Accuracy")):
        ax.set_title(title)
        _epoch_axis(ax)
        _mark_phases_and_selection(ax, records, best_epoch)
        if ax.lines:
            ax.legend(loc="best")
    save_figure(fig, path)


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = "") -> None:
    """The confusion matrix twice (rows = true class): image counts, and row-normalised (recall
    per class, 0–1); ``title`` names the split and checkpoint."""
    counts = np.asarray(cm, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 0.3 * n + 2.4))
    for ax, matrix, normalised in ((axes[0], counts, False), (axes[1], rates, True)):
        top = 1.0 if normalised else max(matrix.max(), 1.0)
        image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=top)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for i in range(n):
            for j in range(n):
                text = f"{matrix[i, j]:.2f}" if normalised else str(int(matrix[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if n > 8 else 9,
                        color="white" if matrix[i, j] > top / 2 else "black")
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("row-normalised (recall)" if normalised else "images")
    fig.suptitle(f"Confusion matrix{': ' + title if title else ''}")
    save_figure(fig, path)


def _nested(value: object, index: Sequence[int]) -> float | None:
    """``value[i][j]...`` or None when any level is missing (records may differ in shape)."""
    for i in index:
        if not isinstance(value, Sequence) or i >= len(value):
            return None
        value = value[i]
    return float(value)


def _plot_weight_series(ax: Axes, records: list[dict], key: str, index: Sequence[int], label: str,
                        color=None) -> None:
    """Plot ``record[key][index...]`` vs epoch for the records that have that entry."""
    points = [(r["epoch"], v) for r in records if (v := _nested(r.get(key), index)) is not None]
    if points:
        epochs, values = zip(*points)
        ax.plot(epochs, values, marker="o", markersize=3, label=label, color=color)


def plot_stage_weights(records: list[dict], path: Path, stages: Sequence[Sequence[int]] | None = None,
                       best_epoch: Optional[int] = None) -> None:
    """One panel per stage with its NGA weight on each block, and one with the stage fusion
    weights, all on 0–1 against epoch; panels wrap at three per row. Writes nothing when no stage
    weighs several blocks and nothing is fused (e.g. a model on the final block alone)."""
    nga = [r["nga_weights"] for r in records if r.get("nga_weights")]
    fusion = [r["fusion_weights"] for r in records if r.get("fusion_weights")]
    num_stages = max([len(w) for w in nga] + [len(w) for w in fusion], default=0)
    layers_per_stage = [max((len(w[s]) for w in nga if s < len(w)), default=0) for s in range(num_stages)]
    panels = [s for s in range(num_stages) if layers_per_stage[s] > 1] + (["fusion"] if fusion else [])
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, 3.2 * rows), squeeze=False)
    colors = _stage_colors(num_stages)
    for ax, panel in zip(axes.flat, panels):
        if panel == "fusion":
            for s in range(num_stages):
                _plot_weight_series(ax, records, "fusion_weights", (s,),
                                    stage_label(s + 1, stages[s] if stages else None), colors[s])
            ax.set_title("Stage fusion weights")
        else:
            blocks = list(stages[panel]) if stages else []
            for k in range(layers_per_stage[panel]):
                _plot_weight_series(ax, records, "nga_weights", (panel, k),
                                    f"block {blocks[k]}" if k < len(blocks) else f"layer {k + 1}")
            ax.set_title(f"NGA weights, {stage_label(panel + 1, blocks)}")
        ax.set_ylim(0, 1)
        ax.set_ylabel("weight")
        _epoch_axis(ax)
        if best_epoch:
            ax.axvline(best_epoch, color="tab:red", linewidth=1.2, alpha=0.5)
        if ax.lines:
            ax.legend(loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    save_figure(fig, path)


def plot_stage_class_accuracy(per_class: dict[str, list[float]], classes: Sequence[str], path: Path,
                              title: str = "") -> None:
    """Accuracy (recall) per class of each stage's own prediction and of the fused one, as grouped
    bars on 0–1: which stage recognises which emotion. ``per_class`` maps a series name to C values."""
    names = list(per_class)
    stage_names = [n for n in names if n != "fused"]
    colors = dict(zip(stage_names, _stage_colors(len(stage_names))))
    colors["fused"] = FUSED_COLOR
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2))
    width = 0.8 / len(names)
    x = np.arange(len(classes))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, per_class[name], width, label=name, color=colors[name])
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (recall)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(ncol=min(len(names), 4), loc="upper center", bbox_to_anchor=(0.5, -0.28))
    ax.set_title(title or "Accuracy per class of each stage")
    save_figure(fig, path)


def _radar(ax: Axes, classes: Sequence[str], series: dict[str, np.ndarray], styles: dict[str, dict],
           top: Optional[float] = None, labels: bool = True) -> None:
    """Distributions over the emotion wheel, classes in wheel order around the circle."""
    angles = np.linspace(0, 2 * np.pi, len(classes), endpoint=False)
    closed = np.concatenate([angles, angles[:1]])
    for name, values in series.items():
        style = dict(styles.get(name, {}))
        fill = style.pop("fill", True)
        values = np.concatenate([values, values[:1]])
        ax.plot(closed, values, label=name, **style)
        if fill:
            ax.fill(closed, values, alpha=0.12, color=ax.lines[-1].get_color())
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    ax.set_xticks(angles, classes if labels else [""] * len(classes), fontsize=9)
    ax.set_ylim(0, top or max(0.05, max(float(v.max()) for v in series.values()) * 1.1))
    ax.yaxis.set_major_locator(MaxNLocator(3))
    ax.set_rlabel_position(180 / len(classes))  # between the first two classes, clear of their names
    ax.tick_params(axis="y", labelsize=7, labelcolor="dimgrey")


def plot_wheel_means(classes: Sequence[str], target: np.ndarray, predicted: np.ndarray,
                     stages: Optional[np.ndarray], path: Path, stage_names: Sequence[str] = (),
                     title: str = "") -> None:
    """The mean predicted and target distributions over a split on the emotion wheel (polar plot);
    with ``stages`` [S, C], a second wheel with each stage's mean prediction."""
    panels = 2 if stages is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(WIDTH if panels == 2 else 5.2, 4.8),
                             subplot_kw={"projection": "polar"}, squeeze=False)
    top = 1.1 * max(float(target.max()), float(predicted.max()),
                    float(stages.max()) if stages is not None else 0.0)
    styles = {"target": {"color": "tab:orange", "linewidth": 2}, "predicted (fused)": {"color": FUSED_COLOR}}
    _radar(axes[0, 0], classes, {"target": target, "predicted (fused)": predicted}, styles, top)
    axes[0, 0].set_title("Mean distribution: target vs predicted", pad=18)
    axes[0, 0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    if stages is not None:
        names = list(stage_names) or [f"stage {s + 1}" for s in range(len(stages))]
        colors = _stage_colors(len(stages))
        series = {"target": target, **dict(zip(names, stages))}
        stage_styles = {"target": {"color": "tab:orange", "linewidth": 2, "fill": False},
                        **{n: {"color": c, "fill": False} for n, c in zip(names, colors)}}
        _radar(axes[0, 1], classes, series, stage_styles, top)
        axes[0, 1].set_title("Mean distribution of each stage", pad=18)
        axes[0, 1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_examples(examples: Sequence[dict], classes: Sequence[str], path: Path, per_row: int = 3) -> None:
    """Example images, each above its predicted and target distributions on the emotion wheel.
    Each example: ``image`` (path), ``title``, ``predicted`` [C], ``target`` [C] or None, and
    ``group`` (e.g. "most confident correct"); one band of rows per group."""
    groups = list(dict.fromkeys(e["group"] for e in examples))
    if not groups:
        return
    bands = [[e for e in examples if e["group"] == g] for g in groups]
    rows = sum(2 * -(-len(band) // per_row) for band in bands)
    fig = plt.figure(figsize=(WIDTH, 3.0 * rows))
    grid = fig.add_gridspec(rows, per_row, height_ratios=[1.15, 1.65] * (rows // 2))
    row = 0
    styles = {"target": {"color": "tab:orange", "linewidth": 2}, "predicted": {"color": FUSED_COLOR}}
    for group, band in zip(groups, bands):
        for start in range(0, len(band), per_row):
            for col, example in enumerate(band[start:start + per_row]):
                image_ax = fig.add_subplot(grid[row, col])
                try:
                    image = Image.open(example["image"]).convert("RGB")
                    image.thumbnail((256, 256))  # a photograph is not embedded at full size in the SVG
                    image_ax.imshow(image)
                except OSError:
                    image_ax.text(0.5, 0.5, "image not found", ha="center", va="center")
                image_ax.set_axis_off()
                image_ax.set_title(example["title"], fontsize=9)
                if col == 0:
                    image_ax.text(-0.15, 0.5, group, transform=image_ax.transAxes, rotation=90, ha="center",
                                  va="center", fontsize=10, fontweight="bold")
                wheel_ax = fig.add_subplot(grid[row + 1, col], projection="polar")
                series = {"predicted": np.asarray(example["predicted"])}
                if example.get("target") is not None:
                    series["target"] = np.asarray(example["target"])
                _radar(wheel_ax, classes, series, styles)
            row += 2
    handles = [plt.Line2D([], [], **styles["predicted"]), plt.Line2D([], [], **styles["target"])]
    fig.legend(handles, ["predicted distribution", "target distribution"], loc="lower center", ncol=2)
    fig.tight_layout(rect=(0.02, 0.03, 1, 1))
    save_figure(fig, path, tight=False)


def plot_method_bars(rows: list[dict], key: str, path: Path, ylabel: str, chance: Optional[float] = None) -> None:
    """Mean ± std of ``key`` per method (one bar group per dataset), from sweep result rows, on 0–1."""
    if not rows:
        return
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] + (f" ({r['variant']})" if r.get("variant") else "") for r in rows))
    fig, ax = plt.subplots(figsize=(min(WIDTH, max(6.0, 0.7 * len(methods) * len(datasets) + 2)), 4.2))
    width = 0.8 / len(datasets)
    for d, dataset in enumerate(datasets):
        by_method = {r["method"] + (f" ({r['variant']})" if r.get("variant") else ""): r
                     for r in rows if r["dataset"] == dataset}
        xs = [m + d * width for m in range(len(methods)) if methods[m] in by_method]
        means = [by_method[m][f"{key}_mean"] for m in methods if m in by_method]
        stds = [by_method[m][f"{key}_std"] for m in methods if m in by_method]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=dataset)
        if len(datasets) <= 2:  # more would overlap; results.md has every number
            ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(methods))])
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(True, axis="y", alpha=0.3)
    if len(datasets) > 1 or chance is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    save_figure(fig, path)


def plot_overlaid_curves(curves: dict[str, dict[str, list[dict]]], keys: Sequence[str], path: Path,
                         titles: Sequence[str] = ()) -> None:
    """One row of panels per dataset (``curves[dataset][method]`` = a run's records), one panel per
    key (e.g. train loss, val loss), one line per method against epoch, a method's colour the same
    in every row."""
    methods = list(dict.fromkeys(m for by_method in curves.values() for m in by_method))
    colors = dict(zip(methods, plt.get_cmap("tab20")(np.arange(len(methods)) % 20)))
    legend_rows = 1 + (len(methods) - 1) // 4
    fig, axes = plt.subplots(len(curves), len(keys), figsize=(WIDTH, 3.0 * len(curves) + 0.3 * legend_rows + 0.4),
                             squeeze=False)
    for row, (dataset, by_method) in zip(axes, curves.items()):
        for i, (ax, key) in enumerate(zip(row, keys)):
            for method, records in by_method.items():
                _plot_key(ax, records, key, method, color=colors[method])
            title = titles[i] if i < len(titles) else key
            ax.set_title(f"{dataset}: {title}" if len(curves) > 1 else title)
            _epoch_axis(ax)
            if key.endswith(("accuracy", "f1")):
                ax.set_ylim(0, 1)
    handles = [plt.Line2D([], [], color=colors[m], marker="o", markersize=3) for m in methods]
    if handles:
        fig.legend(handles, methods, loc="lower center", ncol=min(len(methods), 4))
        fig.tight_layout(rect=(0, 0.3 * legend_rows / fig.get_figheight() + 0.02, 1, 1))
    save_figure(fig, path, tight=False)


def weight_matrix(weights: dict[str, dict]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """The runs that learned weights, the image blocks any of them reads, and two matrices with one
    row per run: NGA weight per block (nan where the run reads none) and fusion weight per stage."""
    runs = {name: w for name, w in weights.items() if w.get("nga_weights") or w.get("fusion_weights")}
    blocks = sorted({b for w in runs.values() for stage in w.get("stages") or [] for b in stage})
    stages = max((len(w.get("fusion_weights") or []) for w in runs.values()), default=0)
    nga = np.full((len(runs), len(blocks)), np.nan)
    fusion = np.full((len(runs), stages), np.nan)
    for r, w in enumerate(runs.values()):
        for stage_blocks, stage_weights in zip(w.get("stages") or [], w.get("nga_weights") or []):
            for block, value in zip(stage_blocks, stage_weights):
                nga[r, blocks.index(block)] = value
        fusion[r, :len(w.get("fusion_weights") or [])] = w.get("fusion_weights") or []
    return list(runs), blocks, nga, fusion


def plot_learned_weights(weights: dict[str, dict], path: Path) -> None:
    """Runs' learned weights as two heat maps on 0–1, one row per run: NGA weight per image block
    (blank where the run reads none) and fusion weight per stage (values written in). ``weights[name]``:
    ``nga_weights``, ``fusion_weights``, ``stages`` (the blocks of each stage)."""
    names, blocks, nga, fusion = weight_matrix(weights)
    if not names:
        return
    stages = fusion.shape[1]
    fig, (ax_nga, ax_fusion) = plt.subplots(1, 2, figsize=(WIDTH, 0.24 * len(names) + 1.6),
                                            gridspec_kw={"width_ratios": [max(len(blocks), 1), max(stages, 1) + 1]})
    for ax, values, columns, title in ((ax_nga, nga, [f"b{b}" for b in blocks], "NGA weight per block"),
                                       (ax_fusion, fusion, [f"stage {s + 1}" for s in range(stages)],
                                        "fusion weight per stage")):
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(columns)), columns, fontsize=8)
        ax.set_yticks(range(len(names)), names if ax is ax_nga else [], fontsize=7)
        ax.set_title(title)
    for (r, c), value in np.ndenumerate(fusion):
        if not np.isnan(value):
            ax_fusion.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6,
                           color="white" if value < 0.6 else "black")
    fig.colorbar(image, ax=ax_fusion, fraction=0.08)
    save_figure(fig, path)


def plot_study_history(trials: list[dict], path: Path, ylabel: str) -> None:
    """A tuning study's trials in order: each finished trial's value, each pruned one's last validation
    (a cross), and the best value so far as a step line, on 0–1."""
    fig, ax = plt.subplots(figsize=(WIDTH, 4.0))
    finished = [(t["number"], t["value"]) for t in trials if t["state"] == "COMPLETE"]
    pruned = [(t["number"], t["last_validation"]) for t in trials
              if t["state"] == "PRUNED" and t["last_validation"] is not None]
    if finished:
        numbers, values = zip(*finished)
        ax.scatter(numbers, values, color="tab:blue", zorder=3, label="finished trial")
        ax.step(numbers, np.maximum.accumulate(values), where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color="grey", zorder=3, label="pruned (last validation)")
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    save_figure(fig, path)


def plot_importances(importances: dict[str, float], path: Path) -> None:
    """Each tuned setting's importance for the objective as a horizontal bar, the largest on top."""
    names = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.0 + 0.4 * len(names)))
    bars = ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=9, padding=2)
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_xlim(0, 1)
    ax.grid(True, axis="x", alpha=0.3)
    save_figure(fig, path)
