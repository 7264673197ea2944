"""Self-contained HTML reports: one per run, one per sweep, and a page builder for any other.

:func:`render_html` turns a title and a list of :class:`Section` (markdown-ish paragraphs,
:class:`Table`, :class:`Figure` and collapsible :class:`Details`) into one HTML page with every
figure embedded (base64 PNG or SVG), so the file can be mailed or archived. The run report
(:func:`write_report`) and the sweep report (:func:`write_sweep_report`) are built with it; so can
any other page, e.g.::

    write_html(out / "report.html", "My results", [
        Section("Scores", ["Test split, **8 classes**; see `runs/x`."], [Table(["method", "accuracy"], rows)]),
        Section("Curves", [Figure(out / "plots" / "curves.svg", "Loss and accuracy per epoch")]),
    ])
"""
from __future__ import annotations

import base64
import csv
import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..core.files import atomic_write_text, not_a_run, read_json, read_jsonl
from ..version import __version__
from .plots import (plot_confusion, plot_curves, plot_examples, plot_learned_weights, plot_method_bars,
                    plot_overlaid_curves, plot_stage_class_accuracy, plot_stage_weights, plot_wheel_means,
                    stage_label)

# --- the page builder ----------------------------------------------------------------------------


@dataclass
class Table:
    """A table; cells are shown as given (format numbers before), the first ``label_columns``
    columns left-aligned, the others right-aligned."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    label_columns: int = 1


@dataclass
class Figure:
    """An image file (PNG or SVG) embedded in the page, with a caption (markdown-ish)."""

    path: Path
    caption: str = ""


@dataclass
class Details:
    """Preformatted text (a config, a log) folded under a summary line until clicked."""

    summary: str
    text: str


Block = Union[str, Table, Figure, Details]  # a str is a markdown-ish paragraph


@dataclass
class Section:
    """A titled part of a page: its blocks in order."""

    title: str
    blocks: Sequence[Block] = field(default_factory=list)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1000px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.subtitle{color:#666;margin-top:0} nav{font-size:.92em;color:#444} nav a{margin-right:.9em;white-space:nowrap}
table{border-collapse:collapse;margin:.3em auto .8em;font-size:.85em} .caption{color:#555;font-size:.92em;margin:.6em 0 0}
th,td{border:1px solid #d5d5d5;padding:3px 7px;text-align:right;font-variant-numeric:tabular-nums}
td{white-space:nowrap}
.wide{overflow-x:auto;width:min(calc(100vw - 2em),1500px);margin-left:50%;transform:translateX(-50%)}
th{background:#f2f2f2} td.l,th.l{text-align:left} tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.92em} code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em} summary{cursor:pointer;color:#0a58ca}
"""


def _inline(text: str) -> str:
    """Markdown-ish inline markup, HTML-escaped: `code`, **bold**, *italic*, [text](link)."""
    out = []
    for i, part in enumerate(text.split("`")):
        part = html.escape(part)
        if i % 2:
            out.append(f"<code>{part}</code>")
            continue
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", part)
        part = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', part)
        out.append(part)
    return "".join(out)


def _paragraph(text: str) -> str:
    """A paragraph, or a bullet list when every line starts with "- "."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines and all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return f"<p>{_inline(' '.join(lines))}</p>"


def _table(table: Table) -> str:
    def cells(row: Sequence[Any], tag: str) -> str:
        return "".join(f"<{tag}{' class=l' if i < table.label_columns else ''}>{_inline(str(c))}</{tag}>"
                       for i, c in enumerate(row))

    # a paragraph, not <caption>: a caption wraps to the table's width, which is narrow for small tables
    caption = f'<p class="caption">{_inline(table.caption)}</p>' if table.caption else ""
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in table.rows)
    return (f"{caption}<div class=wide><table><thead><tr>{cells(table.header, 'th')}</tr></thead><tbody>{body}"
            "</tbody></table></div>")


def _figure(figure: Figure) -> str:
    path = Path(figure.path)
    if not path.is_file():
        return ""
    kind = "svg+xml" if path.suffix.lower() == ".svg" else "png"
    data = base64.b64encode(path.read_bytes()).decode()
    caption = f"<figcaption>{_inline(figure.caption)}</figcaption>" if figure.caption else ""
    alt = html.escape(figure.caption or path.stem, quote=True)
    return f'<figure><img alt="{alt}" src="data:image/{kind};base64,{data}">{caption}</figure>'


def _block(block: Block) -> str:
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return _figure(block)
    if isinstance(block, Details):
        return f"<details><summary>{_inline(block.summary)}</summary><pre>{html.escape(block.text)}</pre></details>"
    return _paragraph(block)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """One self-contained HTML page: a title, an optional subtitle (markdown-ish), a table of
    contents and the sections in order. Figures are embedded, so the page has no outside files."""
    nav = " ".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{_anchor(s.title)}"><h2>{html.escape(s.title)}</h2>'
                   + "".join(_block(b) for b in s.blocks) + "</section>" for s in sections)
    sub = f'<p class="subtitle">{_inline(subtitle)}</p>' if subtitle else ""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{sub}<nav>{nav}</nav>{body}</body></html>\n")


def write_html(path: Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """:func:`render_html` written atomically to ``path``; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_html(title, sections, subtitle))
    return path


# --- what a run directory holds ----------------------------------------------------------------

FROZEN = {"zeroshot": "zero-shot CLIP", "textonly": "text-only classifier"}  # the baselines without image training


@dataclass
class PredictionTable:
    """A run's predictions file read back: everything needed to recompute its metrics."""

    paths: list[str]
    labels: np.ndarray  # [N] class indices
    probabilities: np.ndarray  # [N, C] fused
    targets: Optional[np.ndarray]  # [N, C] target distributions (files written since they carry them)
    stages: Optional[np.ndarray]  # [S, N, C] each stage's probabilities


def read_prediction_table(path: Path, classes: Sequence[str]) -> Optional[PredictionTable]:
    """``predictions.csv`` (or ``predictions_val.csv``) by column name; None if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    column = {name: i for i, name in enumerate(header)}

    def block(prefix: str) -> Optional[np.ndarray]:
        if not all(f"{prefix}{c}" in column for c in classes):
            return None
        idx = [column[f"{prefix}{c}"] for c in classes]
        return np.array([[float(row[i]) for i in idx] for row in body]).reshape(len(body), len(classes))

    stages = []
    while (s := block(f"s{len(stages) + 1}_")) is not None:
        stages.append(s)
    index = {c: i for i, c in enumerate(classes)}
    return PredictionTable([row[column["path"]] for row in body],
                           np.array([index[row[column["label"]]] for row in body], dtype=int),
                           block("p_"), block("t_"), np.stack(stages) if stages else None)


@dataclass
class RunFiles:
    """The files of a finished run that its report reads."""

    run_dir: Path
    summary: dict
    info: dict  # run.json
    records: list[dict]  # metrics.jsonl
    config_text: str
    stages: list[list[int]]
    test: Optional[PredictionTable]

    @classmethod
    def read(cls, run_dir: Path, summary: Optional[dict] = None) -> "RunFiles":
        """``summary``: the run's summary while it finishes (summary.json, the mark of a finished run,
        is written after everything else)."""
        run_dir = Path(run_dir)
        for name in ("run.json",) if summary is not None else ("summary.json", "run.json"):
            if not (run_dir / name).is_file():
                raise not_a_run(run_dir, name)
        summary = summary if summary is not None else read_json(run_dir / "summary.json")
        info = read_json(run_dir / "run.json")
        log = run_dir / "metrics.jsonl"
        records = read_jsonl(log) if log.is_file() else []
        config = run_dir / "config.yaml"
        config_text = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else ""
        stages = info.get("stages") or _stages_from_config(config_text)
        return cls(run_dir, summary, info, records, config_text, stages,
                   read_prediction_table(run_dir / "predictions.csv", info["classes"]))

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def method(self) -> str:
        """The model's method, or for a frozen baseline what it evaluates."""
        mode = self.info.get("mode", "train")
        return self.info.get("method", "?") if mode == "train" else FROZEN.get(mode, mode)

    @property
    def stage_names(self) -> list[str]:
        count = len(self.summary["test"].get("stage_accuracy") or [])
        return [stage_label(s + 1, self.stages[s] if s < len(self.stages) else None) for s in range(count)]

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each readable saved split (``splits/*.csv``); a damaged list is left
        out of this table (eval, predict and resume refuse it with a message)."""
        counts = {}
        for split in ("train", "val", "test"):
            path = self.run_dir / "splits" / f"{split}.csv"
            try:
                with open(path, newline="", encoding="utf-8") as f:
                    labels = [row["label"] for row in csv.DictReader(f)]
            except (OSError, UnicodeDecodeError, csv.Error, KeyError):
                continue
            counts[split] = {c: labels.count(c) for c in self.classes}
        return counts


def _stages_from_config(config_text: str) -> list[list[int]]:
    import yaml

    model = (yaml.safe_load(config_text) or {}).get("model") or {} if config_text else {}
    return [list(s) for s in model.get("stages") or []]


def _recall_per_class(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    return [float((predicted[labels == c] == c).mean()) if (labels == c).any() else 0.0 for c in range(num_classes)]


def stage_class_accuracy(table: PredictionTable, stage_names: Sequence[str]) -> dict[str, list[float]]:
    """Accuracy per class (recall) of each stage's own prediction and of the fused one."""
    c = table.probabilities.shape[1]
    out = {}
    if table.stages is not None:
        for name, probs in zip(stage_names, table.stages):
            out[name] = _recall_per_class(probs.argmax(axis=1), table.labels, c)
    out["fused"] = _recall_per_class(table.probabilities.argmax(axis=1), table.labels, c)
    return out


def _examples(table: PredictionTable, classes: Sequence[str], per_group: int = 3) -> list[dict]:
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
    if run.test is not None:
        plot_stage_class_accuracy(stage_class_accuracy(run.test, run.stage_names), classes,
                                  plots / "stage_class_accuracy.png", "Test accuracy per class: each stage and fused")
        done("stage_class_accuracy")
        if run.test.targets is not None:
            stage_means = None if run.test.stages is None else run.test.stages.mean(axis=1)
            plot_wheel_means(classes, run.test.targets.mean(axis=0), run.test.probabilities.mean(axis=0),
                             stage_means, plots / "wheel.png", run.stage_names,
                             f"Test split, {len(run.test.paths)} images")
            done("wheel")
        plot_examples(_examples(run.test, classes), classes, plots / "examples.png")
        done("examples")
    return made


# --- the run report ----------------------------------------------------------------------------


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


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


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_sections(run_dir: Path) -> list[Section]:
    """The sections of a run's report (figures are made by :func:`write_run_figures` first)."""
    run = RunFiles.read(run_dir)
    s, info, classes = run.summary, run.info, run.classes
    test, plots = s["test"], run.run_dir / "plots"
    best = s.get("best_epoch")
    skipped = (s.get("skipped") or {}).get("count", 0)
    facts = [
        f"checkpoint of epoch {best} of {s.get('epochs')}, selected on the validation split; the test split is "
        "evaluated once with it" if best else "no image training: the frozen classifier is evaluated",
        f"{s['num_samples']['test']} test images; {skipped} input(s) skipped"
        + (f"; {len(s['nonfinite_batches_skipped'])} non-finite batch(es) skipped"
           if s.get("nonfinite_batches_skipped") else ""),
        f"run time {_duration(info.get('wall_time_s'))}; hardware: {hardware_text(info)}",
    ]
    overview = [f"Method **{run.method}** (mode `{info.get('mode', 'train')}`), label space "
                f"`{info['label_space']}` ({len(classes)} classes: {', '.join(classes)}). Backbone: "
                f"{backbone_text(info['backbone'])}.", "\n".join(f"- {fact}" for fact in facts)]

    def score_row(name: str, m: Optional[dict]) -> Optional[list[str]]:
        if not m:
            return None
        kl = (m.get("ldl") or {}).get("kl", m.get("kl"))
        return [name, _pct(m["accuracy"]), _pct(m["macro_f1"]), _pct(m["polarity_accuracy"]),
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
    per_class = run.test and stage_class_accuracy(run.test, run.stage_names)
    header = ["class", "images", "precision", "recall", "F1"] + ([*per_class] if per_class else [])
    rows = []
    for c, name in enumerate(classes):
        v = test["per_class"][name]
        rows.append([name, v["support"], f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}"]
                    + ([f"{acc[c]:.3f}" for acc in per_class.values()] if per_class else []))
    stage_rows = [[name, _pct(a)] for name, a in zip(run.stage_names, test.get("stage_accuracy") or [])]
    blocks: list[Block] = [Table(header, rows, "Test split" + ("; the last columns are the accuracy on each class "
                                                              "(recall) of each stage's own prediction and of the "
                                                              "fused one" if per_class else ""))]
    if stage_rows:
        blocks.insert(0, Table(["stage", "test accuracy %"], stage_rows + [["fused", _pct(test["accuracy"])]],
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
    if counts:
        splits = list(counts)
        sections.append(Section("Data", [Table(["class", *splits], [[c, *(counts[sp][c] for sp in splits)]
                                                                    for c in classes]
                                               + [["total", *(sum(counts[sp].values()) for sp in splits)]],
                                               "Images per class in each split (the run's `splits/*.csv`)")]))
    params, eff = s.get("parameters") or {}, info.get("efficiency") or {}
    by_group = [[g, f"{n:,}"] for g, n in (params.get("by_group") or {}).items() if n]
    sections.append(Section("Cost", [
        Table(["trainable parameters", "added parameters", "GFLOPs / image", "latency ms / image"],
              [[f"{params.get('trainable', 0):,}", f"{params.get('added', 0):,}",
                f"{eff.get('gflops_per_image', float('nan')):.3f}",
                f"{eff.get('latency_ms_per_image', float('nan')):.2f}"]],
              f"Latency: median over batches of {eff.get('latency_batch', '?')} on {hardware_text(info)}",
              label_columns=0),
        *([Table(["parameter group", "parameters"], by_group,
                 "Size of each parameter group; trainable are the groups some phase trains")] if by_group else [])]))
    if run.config_text:
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


def write_sweep_report(out_dir: Path, rows: Sequence[dict], runs: Sequence[Any], reference: Optional[str] = None,
                       comparisons: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]], str]] = ()) -> Path:
    """``report.html`` of a sweep: the mean ± std table, the comparison tables (title, header,
    cells, notes: :func:`hclafter.sweep.evidence_tables`), every run with a link to its own
    report, and the comparison figures. ``rows``: :func:`hclafter.sweep.summarise`; ``runs``: its
    plan; ``reference``: the name of the method parameters added are counted against."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    table_rows = []
    for r in rows:
        added = "–" if r["added_over_reference"] is None else f"{r['added_over_reference']:+,d}"
        table_rows.append([r["dataset"], r["name"] + (f" ({r['variant']})" if r["variant"] else ""), r["seeds"],
                           *(f"{100 * r[k + '_mean']:.2f} ± {100 * r[k + '_std']:.2f}"
                             for k in ("accuracy", "macro_f1", "polarity_accuracy")),
                           f"{r['kl_mean']:.3f} ± {r['kl_std']:.3f}", f"{r['trained_params']:,d}", added,
                           f"{r['gflops_per_image']:.3f}", f"{r['latency_ms_per_image']:.2f}"])
    per_run, seconds, hardware = [], 0.0, None
    for run in runs:
        if not (run.out / "summary.json").is_file():
            continue
        files = RunFiles.read(run.out)
        write_report(run.out, redraw=False)
        seconds += files.info.get("wall_time_s") or 0.0
        hardware = hardware or files.info
        link = run.out.relative_to(out_dir) / "report.html"
        per_run.append([run.dataset, run.method + (f" ({run.variant})" if run.variant else ""), run.seed,
                        _pct(files.summary["test"]["accuracy"]), _pct(files.summary["test"]["macro_f1"]),
                        files.summary.get("best_epoch") or "–", _duration(files.info.get("wall_time_s")),
                        f"[report]({link.as_posix()})"])
    sections = [
        Section("Results", [
            f"{len(per_run)} runs; test split, mean ± std over seeds; models selected on validation. Total run time "
            f"{_duration(seconds)}; hardware: {hardware_text(hardware) if hardware else 'not recorded'}.",
            Table(["dataset", "method", "seeds", "accuracy %", "macro-F1 %", "polarity %", "KL ↓", "trained params",
                   f"added vs {reference or 'reference'}", "GFLOPs / image", "ms / image"], table_rows,
                  "Parameters: those trained, and those added over the reference method (– where that means "
                  "nothing); latency: median per image", label_columns=2),
            Figure(plots / "accuracy.svg", "Test accuracy per method, mean ± std over seeds.")]),
        *([Section("Comparisons", [block for title, header, cells, notes in comparisons
                                   for block in (Table(header, cells, title), *notes.strip().split("\n\n"))])]
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
        if key not in first_seed and (run.out / "summary.json").is_file():
            first_seed[key] = RunFiles.read(run.out)
    curves: dict[str, dict[str, list[dict]]] = {}
    for key, files in first_seed.items():
        dataset, method = key.split("/", 1)
        curves.setdefault(dataset, {})[method] = files.records
    plot_overlaid_curves(curves, ("train_loss", "val_loss", "val_accuracy"), out_dir / "plots" / "train_loss.png",
                         ("train loss", "validation loss", "validation accuracy"))
    plot_learned_weights({k: {**(f.records[-1] if f.records else {}), "stages": f.stages}
                       for k, f in first_seed.items()}, out_dir / "plots" / "learned_weights.png")
