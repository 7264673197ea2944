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
interrupted sweep again finishes only what is missing.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from .files import atomic_write_text, write_json
from .config import ConfigError, load_config
from .metrics import HEADLINE
from .report import write_sweep_figures, write_sweep_report

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
    unknown = sorted(set(spec) - {"base", "methods", "datasets", "overrides", "grid", "seeds", "slurm"})
    if unknown:
        raise ConfigError(f"{sweep_file}: unknown keys {unknown}; expected base, methods, datasets, overrides, "
                          "grid, seeds, slurm")
    if not spec.get("methods"):
        raise ConfigError(f"{sweep_file}: 'methods' must map method names to config files")
    here = sweep_file.parent
    base = _paths(here, spec.get("base"), "base")
    datasets = {name: _paths(here, files, f"datasets.{name}") for name, files in (spec.get("datasets") or
                                                                                 {"default": []}).items()}
    methods = {name: _paths(here, files, f"methods.{name}") for name, files in spec["methods"].items()}
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


def run_sweep(sweep_file: Path, out_dir: Path, overrides: Sequence[str] = (), progress: bool = True) -> list[dict]:
    """Run (or finish) every run of the sweep, then write the results tables and plots."""
    from .run import train_run

    out_dir = Path(out_dir)
    runs = plan(sweep_file, out_dir, overrides)
    for i, run in enumerate(runs, start=1):
        name = f"[{i}/{len(runs)}] {run.dataset} / {run.method}{' / ' + run.variant if run.variant else ''} / seed {run.seed}"
        if (run.out / "summary.json").is_file():
            print(f"{name}: done earlier, skipped")
            continue
        resume = (run.out / "checkpoints" / "latest.json").is_file()
        if run.out.exists() and not resume:
            shutil.rmtree(run.out)  # started but never reached a saved state: nothing to keep
        print(f"{name}: {'resuming' if resume else 'running'}")
        train_run(load_config(run.configs, run.overrides), run.out, progress=progress, resume=resume)
    rows = summarise(runs)
    write_results(rows, runs, out_dir)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(runs: list[SweepRun]) -> list[dict]:
    """One row per (dataset, method, variant): mean and std over seeds, and efficiency."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        summary = json.loads((run.out / "summary.json").read_text(encoding="utf-8"))
        summary["efficiency"] = json.loads((run.out / "run.json").read_text(encoding="utf-8"))["efficiency"]
        groups.setdefault((run.dataset, run.method, run.variant), []).append(summary)
    rows = []
    for (dataset, method, variant), summaries in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "method": method, "variant": variant, "seeds": len(summaries)}
        for key in HEADLINE:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([s["test"][key] for s in summaries])
        for key in LDL:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([s["test"]["ldl"][key] for s in summaries])
        first = summaries[0]
        row["trainable_params"] = first["parameters"]["trainable"]
        row["added_params"] = first["parameters"]["added"]
        row["gflops_per_image"] = first["efficiency"]["gflops_per_image"]
        row["latency_ms_per_image"] = float(np.median([s["efficiency"]["latency_ms_per_image"] for s in summaries]))
        rows.append(row)
    lafter = {(r["dataset"], r["variant"]): r["added_params"] for r in rows if r["method"] == "lafter"}
    for row in rows:
        reference = lafter.get((row["dataset"], row["variant"]))
        row["added_over_lafter"] = row["added_params"] - reference if reference is not None else None
    return rows


def _markdown(rows: list[dict]) -> str:
    header = ["dataset", "method", "seeds", "accuracy %", "macro-F1 %", "polarity %", "KL ↓", "cosine ↑",
              "trainable", "added vs LaFTer", "GFLOPs/img", "latency ms/img"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pct(row, key):
        return f"{100 * row[key + '_mean']:.2f} ± {100 * row[key + '_std']:.2f}"

    for r in rows:
        method = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        added = "" if r["added_over_lafter"] is None else f"{r['added_over_lafter']:+,d}"
        lines.append("| " + " | ".join([
            r["dataset"], method, str(r["seeds"]), pct(r, "accuracy"), pct(r, "macro_f1"), pct(r, "polarity_accuracy"),
            f"{r['kl_mean']:.4f} ± {r['kl_std']:.4f}", f"{r['cosine_mean']:.4f} ± {r['cosine_std']:.4f}",
            f"{r['trainable_params']:,d}", added, f"{r['gflops_per_image']:.3f}", f"{r['latency_ms_per_image']:.2f}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], runs: list[SweepRun], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", table.getvalue())
    atomic_write_text(out_dir / "results.md", "# Sweep results (test split, mean ± std over seeds)\n\n" +
                      _markdown(rows) + "\nPlots: `plots/accuracy.png`, `plots/train_loss.png`, "
                                        "`plots/learned_weights.png`; all of it with every run in `report.html`.\n")
    write_json(out_dir / "sweep.json", [{"dataset": r.dataset, "method": r.method, "variant": r.variant,
                                         "seed": r.seed, "out": str(r.out)} for r in runs])
    write_sweep_figures(out_dir, rows, runs)
    write_sweep_report(out_dir, rows, runs)
