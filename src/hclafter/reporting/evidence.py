"""The tables we print from run directories: a sweep's results (mean ± std per method) and the
comparison tables of the evidence protocol.

Every number comes from the runs' files: ``summary.json`` (parameter counts), ``run.json``
(backbone identity), ``predictions.csv`` and ``predictions_val.csv`` (labels, probabilities,
logits and targets per image). A table has one row per method with mean ± std over seeds, the
distribution metrics raw and after temperature scaling fitted on validation, and, against the
headline method, the paired accuracy difference with its bootstrap CI, McNemar's p and a verdict.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..core.metrics import STILL_IMPROVING, ldl_metrics
from ..core.stats import (Comparison, RunPredictions, compare_runs, expected_calibration_error, fit_temperature,
                          holm, mean_std, scaled_probabilities, verdict)
from ..engine import runfiles
from .format import difference, pm


@dataclass
class MethodRuns:
    """One method's runs, one directory per seed (the same seed order for every method)."""

    key: str  # identifier (sweep or demo key)
    name: str  # display name
    runs: list[Path]


def _calibration(run: Path, test: RunPredictions) -> dict:
    """Temperature fitted on the run's validation logits (NLL), and the test KL and ECE before and
    after applying it."""
    val = runfiles.read_predictions(run, "val", test.classes)
    temperature = fit_temperature(val.logits, val.labels)
    calibrated = scaled_probabilities(test.logits, temperature)
    # From the logits, not the file's 6-decimal probabilities: a probability rounded to 0 would
    # inflate KL (zero-shot CLIP's, at logit scale 100: 1.63 from the file, 1.40 as evaluated).
    raw = scaled_probabilities(test.logits, 1.0)
    return {"temperature": temperature,
            "kl": ldl_metrics(raw, test.targets)["kl"],
            "kl_calibrated": ldl_metrics(calibrated, test.targets)["kl"],
            "ece": expected_calibration_error(raw, test.labels),
            "ece_calibrated": expected_calibration_error(calibrated, test.labels)}


def method_row(method: MethodRuns, classes: Optional[Sequence[str]] = None) -> tuple[dict, list[RunPredictions]]:
    """Mean ± std over seeds of one method's test metrics, and its test predictions per seed."""
    preds = [runfiles.read_predictions(run, "test", classes) for run in method.runs]
    calib = [_calibration(run, p) for run, p in zip(method.runs, preds)]
    summaries = [runfiles.read_summary(run) for run in method.runs]
    row: dict = {"key": method.key, "method": method.name, "seeds": len(method.runs),
                 "test_images": sorted({len(p.labels) for p in preds}),
                 "trained": summaries[0]["parameters"]["trained"], "added": summaries[0]["parameters"]["added"],
                 "frozen": summaries[0].get("epochs", 0) == 0, "still_improving": still_improving(summaries)}
    row["val_accuracy"] = mean_std([s["val"]["accuracy"] for s in summaries])  # of the selected weights
    row["accuracy"] = mean_std([s["test"]["accuracy"] for s in summaries])
    row["macro_f1"] = mean_std([s["test"]["macro_f1"] for s in summaries])
    for key in ("kl", "kl_calibrated", "ece", "ece_calibrated", "temperature"):
        row[key] = mean_std([c[key] for c in calib])
    return row, preds


def still_improving(summaries: Sequence[dict]) -> int:
    """How many of a method's runs ended still improving (SPEC §11); runs without a verdict (frozen
    baselines, runs of older versions) count as not."""
    return sum((s.get("convergence") or {}).get("verdict") == STILL_IMPROVING for s in summaries)


def marked(name: str, row: dict) -> str:
    """A row's method name, with † when some of its runs ended still improving."""
    return f"{name} †" if row["still_improving"] else name


def convergence_note(rows: Sequence[dict], label: Callable[[dict], str] = lambda r: r["method"]) -> str:
    """The footnote of the † rows ('' when there are none); ``label`` names a row."""
    flagged = [f"{label(r)} ({r['still_improving']} of {r['seeds']} seeds)" for r in rows if r["still_improving"]]
    if not flagged:
        return ""
    return ("† Still improving when training ended: " + ", ".join(flagged) + ". Their best validation accuracy in "
            "the last 20 % of the training steps beat the best before by more than 0.5 points, so these rows compare "
            "runs that had not finished learning; a larger budget (train.steps) may change them.")


def random_backbone(run: Path) -> bool:
    """Whether a run's backbone was random-initialised (its numbers then carry no meaning)."""
    weights = runfiles.read_info(run)["backbone"].get("weights")
    return isinstance(weights, str) and weights.startswith("random-init")


def comparison_rows(methods: Sequence[MethodRuns], headline: str, reference: Optional[str] = None,
                    n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """One row per method; every row but the headline's carries the paired comparison with it, and
    with ``reference`` (e.g. LaFTer-sup) given, the added parameters relative to it."""
    keys = [m.key for m in methods]
    if headline not in keys:
        raise ValueError(f"headline method {headline!r} is not among {keys}")
    classes = runfiles.read_predictions(methods[0].runs[0]).classes
    rows, preds = zip(*(method_row(m, classes) for m in methods))
    by_key = dict(zip(keys, preds))
    comparisons: dict[str, Comparison] = compare_runs(by_key[headline], {k: p for k, p in by_key.items()
                                                                         if k != headline}, n_boot=n_boot, seed=seed)
    base = next((r["added"] for r in rows if r["key"] == reference), None)
    for row in rows:
        c = comparisons.get(row["key"])
        row["comparison"] = None if c is None else {
            "difference": c.difference.mean, "ci": list(c.difference.ci), "p_value": c.p_value, "verdict": c.verdict}
        row["added_vs_reference"] = (row["added"] - base if base is not None and not row["frozen"]
                                     and row["added"] >= base else None)
    return list(rows)


def pair_rows(methods: Sequence[MethodRuns], pairs: Sequence[Sequence[str]], n_boot: int = 10000,
              seed: int = 0) -> list[dict]:
    """For each pair (a, b) of method keys: both test accuracies over seeds and the paired
    comparison a − b, as the main table makes it (for options compared with more than one row)."""
    by_key = {m.key: m for m in methods}
    classes = runfiles.read_predictions(methods[0].runs[0]).classes
    preds: dict[str, list[RunPredictions]] = {}
    unconverged = {m.key: still_improving([runfiles.read_summary(run) for run in m.runs]) for m in methods}
    rows = []
    for a, b in pairs:
        for key in (a, b):
            if key not in preds:
                preds[key] = [runfiles.read_predictions(run, "test", classes) for run in by_key[key].runs]
        c = compare_runs(preds[a], {b: preds[b]}, n_boot=n_boot, seed=seed)[b]
        rows.append({"a": by_key[a].name + " †" * bool(unconverged[a]), "b": by_key[b].name + " †" * bool(unconverged[b]),
                     "still_improving": {by_key[k].name: unconverged[k] for k in (a, b) if unconverged[k]},
                     "accuracy_a": c.headline_accuracy,
                     "accuracy_b": c.other_accuracy, "difference": c.difference.mean, "ci": list(c.difference.ci),
                     "p_value": c.p_value, "verdict": c.verdict})
    return rows


def holm_correct(comparisons: Sequence[dict]) -> None:
    """Holm's correction over a family of comparisons (each a dict with ``p_value``, ``ci`` and
    ``verdict``, as the rows above carry them): adds ``p_holm`` and makes the verdict read it, so
    better/worse needs the CI on that side and an adjusted p below 0.05. The CIs stay per comparison."""
    for c, adjusted in zip(comparisons, holm([c["p_value"] for c in comparisons])):
        c["p_holm"] = adjusted
        c["verdict"] = verdict(tuple(c["ci"]), adjusted)


def holm_note(count: int) -> str:
    return (f"Verdicts are corrected for multiple comparisons: Holm's step-down over the {count} comparison(s) of "
            "this report (column 'Holm p'); better/worse needs the 95 % CI on that side and a Holm p below 0.05. "
            "The CIs are not adjusted.")


def pair_cells(rows_by_dataset: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """The pairwise comparisons of every dataset as text cells (header, rows), for Markdown and HTML."""
    adjusted = any("p_holm" in r for rows in rows_by_dataset.values() for r in rows)
    header = ["dataset", "method A", "method B", "A accuracy %", "B accuracy %", "Δ A − B (95 % CI)", "McNemar p",
              *(["Holm p"] if adjusted else []), "A is"]
    cells = [[dataset, r["a"], r["b"], pm(r["accuracy_a"], 100), pm(r["accuracy_b"], 100),
              difference(r["difference"], r["ci"]), f"{r['p_value']:.3g}",
              *([f"{r['p_holm']:.3g}"] if adjusted else []), r["verdict"]]
             for dataset, rows in rows_by_dataset.items() for r in rows]
    return header, cells


def table_cells(rows: Sequence[dict], headline_name: str,
                reference_name: Optional[str] = None) -> tuple[list[str], list[list[str]]]:
    """The comparison table as text cells (header, rows), for Markdown and HTML alike."""
    # The comparison beside the accuracy it is about; distribution and size columns after it.
    adjusted = any(r["comparison"] is not None and "p_holm" in r["comparison"] for r in rows)
    header = ["method", "seeds", "accuracy %", "macro-F1 %", f"Δ accuracy vs {headline_name} (95 % CI)",
              "McNemar p", *(["Holm p"] if adjusted else []), "verdict", "KL ↓ raw", "KL ↓ calibrated", "ECE ↓ raw",
              "ECE ↓ calibrated", "trained params", f"added vs {reference_name or 'reference'}"]
    cells = []
    for r in rows:
        c = r["comparison"]
        diff = "—" if c is None else difference(c["difference"], c["ci"])
        added = "–" if r["added_vs_reference"] is None else f"+{r['added_vs_reference']:,d}"
        holm_cell = ["—" if c is None else f"{c['p_holm']:.3g}"] if adjusted else []
        cells.append([marked(r["method"], r), str(r["seeds"]), pm(r["accuracy"], 100), pm(r["macro_f1"], 100), diff,
                      "—" if c is None else f"{c['p_value']:.3g}", *holm_cell, "(headline)" if c is None else c["verdict"],
                      pm(r["kl"], 1, 3), pm(r["kl_calibrated"], 1, 3), pm(r["ece"], 1, 3),
                      pm(r["ece_calibrated"], 1, 3), f"{r['trained']:,d}", added])
    return header, cells


def table_notes(rows: Sequence[dict], random_init: bool) -> str:
    """What a reader must know to read the table: test-set size, seeds, how the columns are made."""
    sizes = sorted({n for r in rows for n in r["test_images"]})
    notes = [f"Test set: {', '.join(map(str, sizes))} images per seed; mean ± std (ddof 1) over seeds. Δ accuracy: "
             "the headline method minus the row's, pooled over seeds, with a 95 % paired-bootstrap CI over test "
             "images (10,000 resamples); McNemar's exact p on the pooled paired predictions; the verdict says "
             "better/worse only when both the CI and p < 0.05 agree. KL: mean KL(target ‖ prediction); calibrated: "
             "after one temperature per run fitted on the validation split (NLL); ECE: 15 equal-width bins. "
             "Trained params: parameters that receive a gradient in some phase or that a fit without gradients "
             "sets (the probes, Tip-Adapter's cache; text-only trains its classifier on text, not on images)."]
    if any(r["still_improving"] for r in rows):
        notes.append(convergence_note(rows))
    if random_init:
        notes.append("**The backbone is random-initialised: these numbers carry no meaning about the methods.**")
    return "\n\n".join(notes) + "\n"


def sweep_convergence_note(rows: Sequence[dict]) -> str:
    """The † footnote of a sweep's results table (rows of ``hclafter.apps.sweep.summarise``)."""
    return convergence_note(rows, lambda r: f"{r['dataset']} / {r['name']}" + (f" ({r['variant']})" if r["variant"] else ""))


def results_cells(rows: Sequence[dict], reference_name: Optional[str] = None) -> tuple[list[str], list[list[str]]]:
    """A sweep's results table (``hclafter.apps.sweep.summarise`` rows: mean ± std over seeds per
    dataset, method and variant, with cost) as text cells, for Markdown and HTML alike."""
    header = ["dataset", "method", "seeds", "accuracy %", "macro-F1 %", "polarity %", "KL ↓", "cosine ↑",
              "trained params", f"added vs {reference_name or 'reference'}", "GFLOPs / image", "ms / image"]
    cells = []
    for r in rows:
        added = "–" if r["added_over_reference"] is None else f"+{r['added_over_reference']:,d}"
        cells.append([r["dataset"], marked(r["name"] + (f" ({r['variant']})" if r["variant"] else ""), r), str(r["seeds"]),
                      *(pm((r[f"{k}_mean"], r[f"{k}_std"]), 100, 2) for k in ("accuracy", "macro_f1",
                                                                              "polarity_accuracy")),
                      *(pm((r[f"{k}_mean"], r[f"{k}_std"]), 1, 3) for k in ("kl", "cosine")),
                      f"{r['trained_params']:,d}", added, f"{r['gflops_per_image']:.3f}",
                      f"{r['latency_ms_per_image']:.2f}"])
    return header, cells
