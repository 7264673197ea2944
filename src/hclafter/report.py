"""A self-contained HTML page for one run: metrics, per-stage and per-class scores, curves,
confusion matrix and learned weights (images embedded, so the file can be mailed or archived)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .files import atomic_write_text, read_json, read_jsonl
from .plots import plot_confusion, plot_curves, plot_stage_weights


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, title: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` into the run directory and return its path."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no summary.json: it is not a finished run")
    summary = read_json(summary_path)
    info = read_json(run_dir / "run.json")
    records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    plots = run_dir / "plots"
    test = summary["test"]
    if not (plots / "confusion.png").is_file():
        plot_confusion(test["confusion_matrix"], info["classes"], plots / "confusion.png")
    if records and not (plots / "curves.png").is_file():
        plot_curves(records, plots / "curves.png")
        plot_stage_weights(records, plots / "stage_weights.png")

    scores = [[name, f"{100 * m['accuracy']:.2f}", f"{100 * m['macro_f1']:.2f}", f"{100 * m['polarity_accuracy']:.2f}"]
              for name, m in (("test (selected on val)", test), ("val", summary.get("val")),
                              ("test, last epoch", summary.get("test_last"))) if m]
    scores += [[f"text-only {split}", f"{100 * m['accuracy']:.2f}", f"{100 * m['macro_f1']:.2f}",
                f"{100 * m['polarity_accuracy']:.2f}"] for split, m in (summary.get("text_only") or {}).items()]
    stages = [[f"stage {s + 1}", f"{100 * a:.2f}"] for s, a in enumerate(test.get("stage_accuracy") or [])]
    per_class = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
                 for c, v in test["per_class"].items()]
    ldl = [[k, f"{v:.4f}"] for k, v in test["ldl"].items()]
    eff = info.get("efficiency", {})
    params = summary.get("parameters", {})
    sections = [
        f"<h1>Run {html.escape(run_dir.name)}</h1>",
        f"<p>mode {html.escape(info.get('mode', 'train'))}, method {html.escape(info.get('method', ''))}, "
        f"label space {html.escape(info['label_space'])}, backbone {html.escape(json.dumps(info['backbone']['weights']))}"
        f"; best epoch {summary.get('best_epoch', '-')} of {summary.get('epochs', 0)}; "
        f"{summary['num_samples']['test']} test images; {summary.get('skipped', {}).get('count', 0)} inputs skipped.</p>",
        "<h2>Scores (%)</h2>" + _table(["", "accuracy", "macro-F1", "polarity accuracy"], scores),
        "<h2>Per-stage accuracy (%)</h2>" + _table(["stage", "accuracy"], stages) if stages else "",
        "<h2>Emotion distributions (test)</h2>" + _table(["metric", "value"], ldl),
        "<h2>Per class (test)</h2>" + _table(["class", "precision", "recall", "F1", "images"], per_class),
        "<h2>Cost</h2>" + _table(["trainable parameters", "added parameters", "GFLOPs / image", "latency ms / image"],
                                 [[f"{params.get('trainable', 0):,}", f"{params.get('added', 0):,}",
                                   f"{eff.get('gflops_per_image', float('nan')):.3f}",
                                   f"{eff.get('latency_ms_per_image', float('nan')):.2f}"]]),
        _image(plots / "curves.png", "Learning curves"),
        _image(plots / "confusion.png", "Confusion matrix (test)"),
        _image(plots / "stage_weights.png", "NGA and fusion weights over epochs"),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    out = run_dir / "report.html"
    atomic_write_text(out, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run_dir.name)}"
                           f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>\n")
    return out
