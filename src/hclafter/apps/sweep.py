"""A grid of (method × dataset × overrides) × seeds, run one after another, summarised as
mean ± std tables (Markdown and CSV) and plots.

A sweep file (YAML; paths relative to it)::

    base: [../tiny.yaml]                 # merged first into every run
    methods: {lafter: ../methods/lafter.yaml, hybrid: ../methods/hybrid.yaml}
    datasets: {fi: [../datasets/fi.yaml]}  # optional
    overrides: [data.root=/data/FI]      # optional, every run
    grid: {train.loss.lam: [0.5, 0.8]}   # optional, a cartesian product of overrides
    seeds: [0, 1, 2]
    slurm: {partition: gpu, gpus_per_run: 1}  # optional, for --launcher slurm (see launchers.py)

Finished runs (with a summary.json) are skipped and interrupted ones resumed, so starting an
interrupted sweep again finishes only what is missing; a run made with other settings than the
sweep now plans (its file changed) is refused by name, or run again with ``--rerun-changed``.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import yaml

from ..core.checkpoint import config_differences
from ..core.config import ConfigError, load_config, to_dict
from ..core.files import RunError, atomic_write_text, clear_run_dir, run_lock, write_json
from ..core.metrics import HEADLINE
from ..reporting.evidence import (MethodRuns, comparison_rows, markdown_table, pair_cells, pair_rows, random_backbone,
                                  table_cells, table_notes)
from ..reporting.report import write_sweep_figures, write_sweep_report

LDL = ("kl", "chebyshev", "clark", "canberra", "cosine", "intersection")


@dataclass
class SweepRun:
    dataset: str
    method: str
    variant: str  # the grid combination, "" without a grid
    seed: int
    configs: list[Path]
    overrides: list[str]
    out: Path


SWEEP_KEYS = ("base", "methods", "datasets", "overrides", "grid", "seeds", "headline", "reference", "pairs", "slurm")


def _paths(base: Path, value: Any, key: str) -> list[Path]:
    items = [value] if isinstance(value, str) else list(value or [])
    paths = [(base / p).resolve() for p in items]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"sweep {key}: config file(s) not found: {missing}")
    return paths


def plan(sweep_file: Path, out_dir: Path, extra: Sequence[str] = ()) -> list[SweepRun]:
    """Every run of the sweep, in order, with its run directory under ``out_dir/runs``; ``extra``
    overrides (e.g. from the command line) apply to every run, after the sweep's own."""
    sweep_file = Path(sweep_file)
    try:
        spec = yaml.safe_load(sweep_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{sweep_file}: cannot read the sweep file ({e})") from None
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{sweep_file}: unknown keys {unknown}; expected {', '.join(SWEEP_KEYS)}")
    if not spec.get("methods"):
        raise ConfigError(f"{sweep_file}: 'methods' must map method names to config files")
    here = sweep_file.parent
    base = _paths(here, spec.get("base"), "base")
    datasets = {name: _paths(here, files, f"datasets.{name}") for name, files in (spec.get("datasets") or
                                                                                 {"default": []}).items()}
    methods = {name: _paths(here, files, f"methods.{name}") for name, files in spec["methods"].items()}
    for role in ("headline", "reference"):
        if spec.get(role) is not None and spec[role] not in methods:
            raise ConfigError(f"{sweep_file}: {role} {spec[role]!r} is not one of the methods {list(methods)}")
    for pair in spec.get("pairs") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(m in methods for m in pair)):
            raise ConfigError(f"{sweep_file}: pairs: {pair!r} is not a pair [A, B] of the methods {list(methods)}")
    grid = spec.get("grid") or {}
    variants = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    seeds = spec.get("seeds") or [0]
    runs = []
    for dataset, dataset_files in datasets.items():
        for method, method_files in methods.items():
            for variant in variants:
                tag = ",".join(f"{k}={v}" for k, v in variant.items())
                for seed in seeds:
                    folder = out_dir / "runs" / dataset / method / (tag or "default") / f"seed{seed}"
                    runs.append(SweepRun(dataset, method, tag, int(seed), [*base, *method_files, *dataset_files],
                                         [*(spec.get("overrides") or []), *extra,
                                          *(f"{k}={v}" for k, v in variant.items()), f"seed={seed}"], folder))
    for run in runs:  # every config is checked before the first run starts
        load_config(run.configs, run.overrides)
    return runs


def sweep_roles(sweep_file: Path) -> dict[str, Any]:
    """The sweep file's ``headline`` method (compared with every other row), ``reference`` method
    (parameters added are counted against it) and ``pairs`` (each [A, B] compared on its own), all
    optional."""
    spec = yaml.safe_load(Path(sweep_file).read_text(encoding="utf-8")) or {}
    return {"headline": spec.get("headline"), "reference": spec.get("reference"), "pairs": spec.get("pairs") or []}


def run_status(run: SweepRun) -> str:
    """``done`` (summary.json, written last, is there), ``resume`` (a saved state) or ``new``."""
    if (run.out / "summary.json").is_file():
        return "done"
    return "resume" if (run.out / "checkpoints" / "latest.json").is_file() else "new"


def changed_runs(runs: Sequence[SweepRun], rerun_changed: bool = False) -> set[Path]:
    """The run directories (finished or interrupted) made with other settings than the sweep now
    plans, e.g. after its file changed: a ConfigError naming them and the differing keys, or with
    ``rerun_changed`` their set, to be run again from scratch. Used by the SLURM launcher alike."""
    from ..engine.run import resolve_paths, saved_run_config

    changed: dict[Path, list[str]] = {}
    for run in runs:
        if run_status(run) == "new":
            continue
        planned = load_config(run.configs, run.overrides)
        resolve_paths(planned)
        try:
            differs = config_differences(saved_run_config(run.out), to_dict(planned))
        except (RunError, ConfigError) as e:  # an unreadable config or checkpoint: what it was made with is unknown
            differs = [str(e)]
        if differs:
            changed[run.out] = differs
    if changed and not rerun_changed:
        lines = [f"  {out}: {'; '.join(d[:4])}{' ...' if len(d) > 4 else ''}" for out, d in changed.items()]
        raise ConfigError(f"{len(changed)} run(s) of the sweep were made with other settings than it now plans:\n"
                          + "\n".join(lines) + "\nrun them again from scratch with --rerun-changed (their folders "
                          "are emptied), restore the sweep file, or choose another --out")
    return set(changed)


def execute(runs: Sequence[SweepRun], progress: bool = True, rerun_changed: bool = False) -> None:
    """Run every run not finished yet: finished ones are skipped, interrupted ones resumed, each run's
    directory locked while this process decides about it and runs it."""
    from ..engine.run import train_run

    changed = changed_runs(runs, rerun_changed)
    for i, run in enumerate(runs, start=1):
        name = f"[{i}/{len(runs)}] {run.dataset} / {run.method}{' / ' + run.variant if run.variant else ''} / seed {run.seed}"
        with run_lock(run.out):
            status = "new" if run.out in changed else run_status(run)
            if status == "done":
                print(f"{name}: done earlier, skipped", flush=True)
                continue
            if status == "new":
                clear_run_dir(run.out)  # never reached a saved state, or made with other settings: nothing to keep
            again = " again (its settings changed)" if run.out in changed else ""
            print(f"{name}: {'resuming' if status == 'resume' else 'running' + again}", flush=True)
            train_run(load_config(run.configs, run.overrides), run.out, progress=progress, resume=status == "resume")


def run_sweep(sweep_file: Path, out_dir: Path, overrides: Sequence[str] = (), progress: bool = True,
              rerun_changed: bool = False) -> list[dict]:
    """Run (or finish) every run of the sweep, then write the results tables and plots."""
    out_dir = Path(out_dir)
    runs = plan(sweep_file, out_dir, overrides)
    execute(runs, progress, rerun_changed)
    roles = sweep_roles(sweep_file)
    rows = summarise(runs, roles["reference"])
    write_results(rows, runs, out_dir, **roles)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(runs: list[SweepRun], reference: Optional[str] = None) -> list[dict]:
    """One row per (dataset, method, variant): mean and std over seeds, efficiency, and the
    parameters added relative to the ``reference`` method (None where that means nothing)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        summary = json.loads((run.out / "summary.json").read_text(encoding="utf-8"))
        summary["efficiency"] = json.loads((run.out / "run.json").read_text(encoding="utf-8"))["efficiency"]
        groups.setdefault((run.dataset, run.method, run.variant), []).append(summary)
    rows = []
    for (dataset, method, variant), summaries in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "method": method, "name": _display_name(runs, method),
                               "variant": variant, "seeds": len(summaries), "frozen": summaries[0]["epochs"] == 0}
        for key in HEADLINE:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([s["test"][key] for s in summaries])
        for key in LDL:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([s["test"]["ldl"][key] for s in summaries])
        first = summaries[0]
        row["trained_params"] = first["parameters"]["trained"]
        row["added_params"] = first["parameters"]["added"]
        row["gflops_per_image"] = first["efficiency"]["gflops_per_image"]
        row["latency_ms_per_image"] = float(np.median([s["efficiency"]["latency_ms_per_image"] for s in summaries]))
        rows.append(row)
    base = {(r["dataset"], r["variant"]): r["added_params"] for r in rows if r["method"] == reference}
    for row in rows:
        ref = base.get((row["dataset"], row["variant"]))
        meaningful = ref is not None and not row["frozen"] and row["added_params"] >= ref
        row["added_over_reference"] = row["added_params"] - ref if meaningful else None
    return rows


def _display_name(runs: Sequence[SweepRun], method: str) -> str:
    """A method's name as its config gives it (``name:``), else its sweep key."""
    run = next(r for r in runs if r.method == method)
    return load_config(run.configs, run.overrides).name or method


def _markdown(rows: list[dict], reference: Optional[str]) -> str:
    header = ["dataset", "method", "seeds", "accuracy %", "macro-F1 %", "polarity %", "KL ↓", "cosine ↑",
              "trained", f"added vs {reference or 'reference'}", "GFLOPs/img", "latency ms/img"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pct(row, key):
        return f"{100 * row[key + '_mean']:.2f} ± {100 * row[key + '_std']:.2f}"

    for r in rows:
        method = r["name"] + (f" ({r['variant']})" if r["variant"] else "")
        added = "–" if r["added_over_reference"] is None else f"+{r['added_over_reference']:,d}"
        lines.append("| " + " | ".join([
            r["dataset"], method, str(r["seeds"]), pct(r, "accuracy"), pct(r, "macro_f1"), pct(r, "polarity_accuracy"),
            f"{r['kl_mean']:.4f} ± {r['kl_std']:.4f}", f"{r['cosine_mean']:.4f} ± {r['cosine_std']:.4f}",
            f"{r['trained_params']:,d}", added, f"{r['gflops_per_image']:.3f}", f"{r['latency_ms_per_image']:.2f}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def _method_groups(runs: Sequence[SweepRun]) -> Iterator[tuple[str, list[SweepRun], list[MethodRuns]]]:
    """Per dataset and variant: its title, its runs and its methods' runs (seeds in sweep order)."""
    for dataset, variant in dict.fromkeys((r.dataset, r.variant) for r in runs):
        group = [r for r in runs if (r.dataset, r.variant) == (dataset, variant)]
        yield (f"{dataset}{' / ' + variant if variant else ''}", group,
               [MethodRuns(m, _display_name(group, m), [r.out for r in group if r.method == m])
                for m in dict.fromkeys(r.method for r in group)])


def evidence_tables(runs: Sequence[SweepRun], headline: Optional[str], reference: Optional[str],
                    pairs: Sequence[Sequence[str]] = ()) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The comparison tables of the evidence protocol (SPEC §9) as (title, header, cells, notes):
    one per dataset and variant against the headline method (if any), then one of the sweep's ``pairs``."""
    tables, pair_rows_by_title = [], {}
    for title, group, methods in _method_groups(runs):
        if headline:
            rows = comparison_rows(methods, headline, reference)
            names = {m.key: m.name for m in methods}
            tables.append((title, *table_cells(rows, names[headline], names.get(reference)),
                           table_notes(rows, random_backbone(group[0].out))))
        if pairs:
            pair_rows_by_title[title] = pair_rows(methods, pairs)
    if pairs:
        tables.append(("Pairwise comparisons", *pair_cells(pair_rows_by_title),
                       "Each pair as in the tables above, with A in the headline's place: Δ is A minus B, pooled "
                       "over seeds, 95 % paired-bootstrap CI over test images; McNemar's exact p; the last column "
                       "says whether A is better, worse or not distinguishable from B at 95 %.\n"))
    return tables


def write_results(rows: list[dict], runs: list[SweepRun], out_dir: Path, headline: Optional[str] = None,
                  reference: Optional[str] = None, pairs: Sequence[Sequence[str]] = ()) -> None:
    """results.csv and results.md (with the comparison tables when the sweep names a headline
    method, and the pairwise ones when it names pairs), sweep.json, and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", table.getvalue())
    tables = evidence_tables(runs, headline, reference, pairs) if headline or pairs else []
    comparisons = "\n".join(f"## {title}\n\n" + markdown_table(header, cells) + "\n" + notes
                             for title, header, cells, notes in tables)
    atomic_write_text(out_dir / "results.md", "# Sweep results (test split, mean ± std over seeds)\n\n" +
                      _markdown(rows, reference) + "\nPlots: `plots/accuracy.png`, `plots/train_loss.png`, "
                                                   "`plots/learned_weights.png`; all of it with every run in "
                                                   "`report.html`.\n\n" + comparisons)
    write_json(out_dir / "sweep.json", [{"dataset": r.dataset, "method": r.method, "variant": r.variant,
                                         "seed": r.seed, "out": str(r.out)} for r in runs])
    write_sweep_figures(out_dir, rows, runs)
    write_sweep_report(out_dir, rows, runs, _display_name(runs, reference) if reference else None, tables)
