"""The reports of a run and of a sweep, and a run's figures, all read from their files.

A run's report (:func:`write_report`) and a sweep's (:func:`write_sweep_report`) are pages of
``html.py``; the run's figures (:func:`write_run_figures`) are drawn into its ``plots/``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..core.checkpoint import verify_run_files
from ..core.config import to_dict
from ..core.files import not_a_run
from ..core.stats import RunPredictions
from ..data import load_split_files
from ..engine import runfiles
from ..version import __version__
from .evidence import results_cells, still_improving, sweep_convergence_note
from .format import duration, pct
from .html import Block, Details, Figure, Section, Table, write_html
from .plots import (plot_confusion, plot_curves, plot_examples, plot_learned_weights, plot_method_bars,
                    plot_overlaid_curves, plot_stage_class_accuracy, plot_stage_weights, plot_wheel_means,
                    stage_label)

# --- what a run directory holds ----------------------------------------------------------------

FROZEN = {"zeroshot": "zero-shot CLIP", "textonly": "text-only classifier"}  # the baselines without image training


@dataclass
class RunFiles:
    """The files of a finished run that its report reads."""

    run_dir: Path
    summary: dict
    info: dict  # run.json
    records: list[dict]  # metrics.jsonl
    config_text: str
    test: RunPredictions

    @classmethod
    def read(cls, run_dir: Path, summary: Optional[dict] = None) -> "RunFiles":
        """``summary``: the run's summary while it finishes (summary.json, the mark of a finished run,
        is written after everything else)."""
        run_dir = Path(run_dir)
        if summary is None and not runfiles.is_finished(run_dir):
            raise not_a_run(run_dir, runfiles.SUMMARY)
        if not (run_dir / runfiles.INFO).is_file():
            raise not_a_run(run_dir, runfiles.INFO)
        info = runfiles.read_info(run_dir)
        summary = runfiles.tested(run_dir, summary if summary is not None else runfiles.read_summary(run_dir))
        records, test = runfiles.read_records(run_dir), runfiles.read_predictions(run_dir, "test", info["classes"])
        # eval and predict refuse an edited config.yaml or split list: so does the report of its figures
        verify_run_files(run_dir, info, to_dict(runfiles.read_config(run_dir)))
        config = (run_dir / runfiles.CONFIG).read_text(encoding="utf-8", errors="replace")
        return cls(run_dir, summary, info, records, config, test)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def stages(self) -> list[list[int]]:
        """The image blocks each stage reads (none for a frozen baseline)."""
        return self.info.get("stages") or []

    @property
    def method(self) -> str:
        """The model's method, or for a frozen baseline what it evaluates."""
        mode = self.info["mode"]
        return self.info["method"] if mode == "train" else FROZEN.get(mode, mode)

    @property
    def stage_names(self) -> list[str]:
        count = len(self.summary["test"].get("stage_accuracy") or [])
        return [stage_label(s + 1, self.stages[s] if s < len(self.stages) else None) for s in range(count)]

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each saved split (``splits/*.csv``)."""
        data = load_split_files(self.run_dir / "splits", runfiles.info_wheel(self.info))
        return {split: {c: sum(s.label == i for s in data[split]) for i, c in enumerate(self.classes)}
                for split in data.splits}


def _recall_per_class(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    return [float((predicted[labels == c] == c).mean()) if (labels == c).any() else 0.0 for c in range(num_classes)]


def stage_class_accuracy(table: RunPredictions, stage_names: Sequence[str]) -> dict[str, list[float]]:
    """Accuracy per class (recall) of each stage's own prediction and of the fused one."""
    c = table.probabilities.shape[1]
    out = {}
    if table.stages is not None:
        for name, probs in zip(stage_names, table.stages):
            out[name] = _recall_per_class(probs.argmax(axis=1), table.labels, c)
    out["fused"] = _recall_per_class(table.probabilities.argmax(axis=1), table.labels, c)
    return out


def _examples(table: RunPredictions, classes: Sequence[str], per_group: int = 3) -> list[dict]:
    """The most confident correct and the most confident wrong test predictions."""
    predicted = table.probabilities.argmax(axis=1)
    confidence = table.probabilities.max(axis=1)
    out = []
    for group, mask in (("most confident correct", predicted == table.labels),
                        ("most confident wrong", predicted != table.labels)):
        for i in sorted(np.flatnonzero(mask), key=lambda i: -confidence[i])[:per_group]:
            title = (f"{classes[predicted[i]]} ({confidence[i]:.2f})" if predicted[i] == table.labels[i] else
                     f"{classes[predicted[i]]} ({confidence[i]:.2f}), true: {classes[table.labels[i]]}")
            out.append({"group": group, "image": table.paths[i], "title": title, "predicted": table.probabilities[i],
                        "target": None if table.targets is None else table.targets[i]})
    return out


def write_run_figures(run_dir: Path, summary: Optional[dict] = None) -> dict[str, Path]:
    """Every figure of a finished run into ``plots/`` (PNG and SVG); returns the PNGs by name.
    Figures that need what an older run did not record (targets, per-stage predictions) are left out.
    ``summary``: the summary of a run that is finishing (see :meth:`RunFiles.read`)."""
    run = RunFiles.read(run_dir, summary)
    plots = run.run_dir / "plots"
    test, classes, best = run.summary["test"], run.classes, run.summary.get("best_epoch")
    made = {}

    def done(name: str) -> None:
        if (plots / f"{name}.png").is_file():
            made[name] = plots / f"{name}.png"

    if run.records:
        plot_curves(run.records, plots / "curves.png", best)
        done("curves")
        plot_stage_weights(run.records, plots / "stage_weights.png", run.stages, best)
        done("stage_weights")
    checkpoint = f"epoch {best}, selected on val" if best else "no training"
    plot_confusion(test["confusion_matrix"], classes, plots / "confusion.png",
                   f"test split ({test['num_samples']} images), {checkpoint}")
    done("confusion")
    plot_stage_class_accuracy(stage_class_accuracy(run.test, run.stage_names), classes,
                              plots / "stage_class_accuracy.png", "Test accuracy per class: each stage and fused")
    done("stage_class_accuracy")
    stage_means = None if run.test.stages is None else run.test.stages.mean(axis=1)
    plot_wheel_means(classes, run.test.targets.mean(axis=0), run.test.probabilities.mean(axis=0), stage_means,
                     plots / "wheel.png", run.stage_names, f"Test split, {len(run.test.paths)} images")
    done("wheel")
    plot_examples(_examples(run.test, classes), classes, plots / "examples.png")
    done("examples")
    return made


# --- the run report ----------------------------------------------------------------------------


def backbone_text(identity: dict) -> str:
    """"ViT-B-32, weights `ViT-B-32.pt` (sha256 `3a1f0b9c2d4e`)": the identity without raw JSON."""
    name = (identity.get("architecture") or {}).get("name", "?")
    weights = identity.get("weights")
    if isinstance(weights, dict) and "file" in weights:
        what = f"weights `{weights['file']}` (sha256 `{str(weights.get('sha256', ''))[:12]}`)"
    elif isinstance(weights, dict) and "open_clip_tag" in weights:
        what = f"open_clip pretrained tag `{weights['open_clip_tag']}`"
    else:
        what = f"`{weights}`" + (" (not pre-trained: its numbers mean nothing about CLIP)"
                                 if str(weights).startswith("random-init") else "")
    return f"`{name}`, {what}" + (", QuickGELU" if identity.get("quick_gelu") else "")


def hardware_text(info: dict) -> str:
    hw = info.get("hardware")
    if not hw:
        return f"not recorded (torch {info.get('torch_version', '?')})"
    processes = f", {hw['processes']} processes" if hw.get("processes", 1) > 1 else ""
    return (f"{hw['device']} ({hw['device_name']}){processes}, {hw['cpu_cores']} CPU cores, {hw['precision']}; "
            f"{hw['platform']}, Python {hw['python']}, torch {hw['torch']}")


def convergence_text(summary: dict) -> str:
    """The convergence verdict of a trained run, with the numbers it rests on."""
    c = summary["convergence"]
    if c["rise"] is None:
        return (f"**{c['verdict']}**: no validation before the last 20 % of its {summary['steps']} steps, so the curve "
                "cannot show a plateau")
    return (f"**{c['verdict']}**: best validation accuracy {pct(c['best_val_accuracy_last'])} % in the last 20 % of its "
            f"{summary['steps']} steps against {pct(c['best_val_accuracy_before'])} % before them (more than 0.5 points "
            "higher means still improving)")


def run_sections(run_dir: Path) -> list[Section]:
    """The sections of a run's report (figures are made by :func:`write_run_figures` first)."""
    run = RunFiles.read(run_dir)
    s, info, classes = run.summary, run.info, run.classes
    test, plots = s["test"], run.run_dir / "plots"
    best = s.get("best_epoch")
    skipped = (s.get("skipped") or {}).get("count", 0)
    untrained = ("fitted without gradient steps on the frozen tower's features of the training split"
                 if s.get("selection") else "no image training: the frozen classifier is evaluated")
    facts = [
        f"checkpoint of epoch {best} of {s.get('epochs')}, selected on the validation split; the test split is "
        "evaluated once with it" if best else untrained,
        *([f"chosen on the validation split: {', '.join(f'{k} = {v:.4g}' for k, v in s['selection'].items())}"]
          if s.get("selection") else []),
        *([convergence_text(s)] if s.get("convergence") else []),
        f"{s['num_samples']['test']} test images; {skipped} input(s) skipped"
        + (f"; {len(s['nonfinite_batches_skipped'])} non-finite batch(es) skipped"
           if s.get("nonfinite_batches_skipped") else ""),
        f"run time {duration(info.get('wall_time_s'))}; hardware: {hardware_text(info)}",
    ]
    overview = [f"Method **{run.method}** (mode `{info.get('mode', 'train')}`), label space "
                f"`{info['label_space']}` ({len(classes)} classes: {', '.join(classes)}). Backbone: "
                f"{backbone_text(info['backbone'])}.", "\n".join(f"- {fact}" for fact in facts)]

    def score_row(name: str, m: Optional[dict]) -> Optional[list[str]]:
        if not m:
            return None
        kl = (m.get("ldl") or {}).get("kl", m.get("kl"))
        return [name, pct(m["accuracy"]), pct(m["macro_f1"]), pct(m["polarity_accuracy"]),
                "–" if kl is None else f"{kl:.4f}"]

    scores = [score_row("test (selected checkpoint)" if best else "test", test),
              score_row(f"val (epoch {best})" if best else "val", s.get("val")),
              score_row("test, last epoch", s.get("test_last"))]
    scores += [score_row(f"text-only classifier, {split}", m) for split, m in (s.get("text_only") or {}).items()]
    sections = [Section("Overview", [*overview, Table(["", "accuracy %", "macro-F1 %", "polarity acc. %", "KL ↓"],
                                                       [r for r in scores if r],
                                                       "KL: KL(target ‖ predicted distribution), mean over images")])]
    if run.records:
        sections.append(Section("Learning curves", [Figure(
            plots / "curves.svg", "Loss (left; the validation loss is the task loss on val) and accuracy (right) per "
                                  "epoch. Dashed: phase boundaries; red: the epoch selected on val.")]))
    checkpoint = "the selected checkpoint" if best else "no training"
    sections.append(Section("Confusion matrix", [Figure(
        plots / "confusion.svg", f"Test split, {checkpoint}: image counts (left) and rates per true class (right).")]))
    per_class = stage_class_accuracy(run.test, run.stage_names)
    header = ["class", "images", "precision", "recall", "F1", *per_class]
    rows = []
    for c, name in enumerate(classes):
        v = test["per_class"][name]
        rows.append([name, v["support"], f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}",
                     *(f"{acc[c]:.3f}" for acc in per_class.values())])
    stage_rows = [[name, pct(a)] for name, a in zip(run.stage_names, test.get("stage_accuracy") or [])]
    blocks: list[Block] = [Table(header, rows, "Test split; the last columns are the accuracy on each class "
                                               "(recall) of each stage's own prediction and of the fused one")]
    if stage_rows:
        blocks.insert(0, Table(["stage", "test accuracy %"], stage_rows + [["fused", pct(test["accuracy"])]],
                               "Each stage classifies its own feature with the shared classifier"))
        blocks.append(Figure(plots / "stage_class_accuracy.svg", "Accuracy per class of each stage and fused."))
    sections.append(Section("Per class and per stage", blocks))
    ldl = Table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in test["ldl"].items()],
                "Predicted vs target distributions, test split (↓ better: chebyshev, clark, canberra, kl; "
                "↑ better: cosine, intersection)")
    sections.append(Section("Emotion distributions", [ldl, Figure(
        plots / "wheel.svg", "Mean over the test split on the emotion wheel (classes in wheel order): the target "
                             "and the fused prediction (left), each stage's prediction (right).")]))
    if (plots / "examples.svg").is_file():
        sections.append(Section("Examples", [Figure(
            plots / "examples.svg", "The test images predicted with the highest confidence, correctly and wrongly, "
                                    "with their predicted and target distributions on the wheel.")]))
    if (plots / "stage_weights.svg").is_file():
        sections.append(Section("NGA and fusion weights", [Figure(
            plots / "stage_weights.svg", "NGA weight of each block within its stage, and the stage fusion weights, "
                                         "per epoch (red: the selected epoch).")]))
    counts = run.split_counts()
    splits = list(counts)
    sections.append(Section("Data", [Table(["class", *splits], [[c, *(counts[sp][c] for sp in splits)] for c in classes]
                                           + [["total", *(sum(counts[sp].values()) for sp in splits)]],
                                           "Images per class in each split (the run's `splits/*.csv`)")]))
    params, eff = s["parameters"], info["efficiency"]
    by_group = [[g, f"{n:,}"] for g, n in params["by_group"].items() if n]
    sections.append(Section("Cost", [
        Table(["trained parameters", "added parameters", "GFLOPs / image", "latency ms / image"],
              [[f"{params['trained']:,}", f"{params['added']:,}",
                f"{eff['gflops_per_image']:.3f}", f"{eff['latency_ms_per_image']:.2f}"]],
              f"Latency: median over batches of {eff['latency_batch']} on {hardware_text(info)}",
              label_columns=0),
        *([Table(["parameter group", "parameters"], by_group,
                 "Size of each parameter group; trained: the parameters that receive a gradient in some phase "
                 "or that a fit without gradients sets")]
          if by_group else [])]))
    sections.append(Section("Configuration", [
        "The resolved configuration (`config.yaml`): `hclafter train -c config.yaml --out DIR` re-creates the run.",
        Details("show config.yaml", run.config_text)]))
    return sections


def write_report(run_dir: Path, redraw: bool = True) -> Path:
    """Write ``report.html`` into a finished run directory and return its path. Its figures are
    drawn again, or with ``redraw=False`` only when missing (a sweep's runs drew theirs at the end)."""
    run_dir = Path(run_dir)
    run = RunFiles.read(run_dir)
    if redraw or not (run_dir / "plots" / "confusion.svg").is_file():
        write_run_figures(run_dir)
    title = f"Run {run_dir.name}: {run.method}"
    subtitle = f"`{run_dir.resolve()}` · hclafter {__version__} · report written {time.strftime('%Y-%m-%d %H:%M')}"
    return write_html(run_dir / "report.html", title, run_sections(run_dir), subtitle)


# --- the sweep report --------------------------------------------------------------------------


def comparison_tables(header: Sequence[str], cells: Sequence[Sequence[str]], title: str) -> list[Table]:
    """A comparison table (``evidence.table_cells``) for a page, in two halves that each fit its
    width: accuracy and the verdicts, then the distributions and sizes, the method first in both.
    A table without the distribution columns (the pairwise one) stays whole."""
    if "KL ↓ raw" not in header:
        return [Table(header, cells, title)]
    split = list(header).index("KL ↓ raw")
    return [Table(header[:split], [c[:split] for c in cells], f"{title}: accuracy and verdicts"),
            Table([header[0], *header[split:]], [[c[0], *c[split:]] for c in cells],
                  f"{title}: predicted distributions and trained parameters")]


def write_sweep_report(out_dir: Path, rows: Sequence[dict], runs: Sequence[Any], reference: Optional[str] = None,
                       comparisons: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]], str]] = ()) -> Path:
    """``report.html`` of a sweep: the mean ± std table, the comparison tables (title, header,
    cells, notes: :func:`hclafter.apps.sweep.evidence_tables`), every run with a link to its own
    report, and the comparison figures. ``rows``: :func:`hclafter.apps.sweep.summarise`; ``runs``: its
    plan; ``reference``: the name of the method parameters added are counted against."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    header, cells = results_cells(rows, reference)
    per_run, seconds, hardware = [], 0.0, None
    for run in runs:
        if not runfiles.is_finished(run.out):
            continue
        files = RunFiles.read(run.out)
        write_report(run.out, redraw=False)
        seconds += files.info.get("wall_time_s") or 0.0
        hardware = hardware or files.info
        link = run.out.relative_to(out_dir) / "report.html"
        flag = " †" if still_improving([files.summary]) else ""
        per_run.append([run.dataset, run.name + (f" ({run.variant})" if run.variant else "") + flag, run.seed,
                        pct(files.summary["test"]["accuracy"]), pct(files.summary["test"]["macro_f1"]),
                        files.summary.get("best_epoch") or "–", duration(files.info.get("wall_time_s")),
                        f"[report]({link.as_posix()})"])
    sections = [
        Section("Results", [
            f"{len(per_run)} runs; test split, mean ± std over seeds; models selected on validation. Total run time "
            f"{duration(seconds)}; hardware: {hardware_text(hardware) if hardware else 'not recorded'}.",
            Table(header, cells, "Parameters: those trained, and those added over the reference method (– where that "
                                 "means nothing); latency: median per image", label_columns=2),
            *([note] if (note := sweep_convergence_note(rows)) else []),
            Figure(plots / "accuracy.svg", "Test accuracy per method, mean ± std over seeds.")]),
        *([Section("Comparisons", [block for title, header, cells, notes in comparisons
                                   for block in (*comparison_tables(header, cells, title),
                                                 *notes.strip().split("\n\n"))])]
          if comparisons else []),
        Section("Training", [Figure(plots / "train_loss.svg", "Training and validation loss and validation "
                                                              "accuracy per epoch (first seed of each method).")]),
        Section("Learned weights", [Figure(plots / "learned_weights.svg", "Final NGA weight of each image "
                                                                           "block (blank: not read; Cascade-CLIP's "
                                                                           "unnormalised weights above 1 show as 1) "
                                                                           "and stage fusion weights, one row per "
                                                                           "dataset/method (first seed).")]),
        Section("Runs", [Table(["dataset", "method", "seed", "accuracy %", "macro-F1 %", "selected epoch",
                                "run time", ""], per_run, label_columns=2)]),
    ]
    return write_html(out_dir / "report.html", f"Sweep {out_dir.name}", sections,
                      f"`{out_dir.resolve()}` · hclafter {__version__} · {time.strftime('%Y-%m-%d %H:%M')}")


def write_sweep_figures(out_dir: Path, rows: Sequence[dict], runs: Sequence[Any]) -> None:
    """The sweep's comparison figures in ``plots/``: accuracy bars, curves and learned weights of
    the first seed of each method."""
    out_dir = Path(out_dir)
    plot_method_bars(list(rows), "accuracy", out_dir / "plots" / "accuracy.png", "test accuracy")
    first_seed: dict[str, RunFiles] = {}
    for run in runs:
        key = f"{run.dataset}/{run.method}{'/' + run.variant if run.variant else ''}"
        if key not in first_seed and runfiles.is_finished(run.out):
            first_seed[key] = RunFiles.read(run.out)
    curves: dict[str, dict[str, list[dict]]] = {}
    for key, files in first_seed.items():
        dataset, method = key.split("/", 1)
        curves.setdefault(dataset, {})[method] = files.records
    plot_overlaid_curves(curves, ("train_loss", "val_loss", "val_accuracy"), out_dir / "plots" / "train_loss.png",
                         ("train loss", "validation loss", "validation accuracy"))
    plot_learned_weights({k: {**(f.records[-1] if f.records else {}), "stages": f.stages}
                       for k, f in first_seed.items()}, out_dir / "plots" / "learned_weights.png")
