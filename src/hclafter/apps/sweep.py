"""A grid of (method × dataset × overrides) × seeds, run one after another, summarised as
mean ± std tables (Markdown and CSV) and plots.

A sweep file (YAML; paths relative to it)::

    base: [../tiny.yaml]                 # merged first into every run
    methods: {lafter: ../methods/lafter.yaml, hybrid: ../methods/hybrid.yaml}
    datasets: {fi: [../datasets/fi.yaml]}  # optional
    overrides: [data.root=/data/FI]      # optional, every run
    grid: {train.loss.lam: [0.5, 0.8]}   # optional, a cartesian product of overrides
    seeds: [0, 1, 2]
    tune: {trials: 20}                   # optional: every method tuned on validation, 20 trials each, first
    slurm: {partition: gpu, gpus_per_run: 1}  # optional, for --launcher slurm (see launchers.py)

Finished runs (with a summary.json) are skipped and interrupted ones resumed, so starting an
interrupted sweep again finishes only what is missing; a run made with other settings than the
sweep now plans (its file changed) is refused by name, or run again with ``--rerun-changed``.
"""
from __future__ import annotations

import csv
import io
import itertools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import yaml

from ..core.checkpoint import config_differences
from ..core.config import ConfigError, load_config, to_dict
from ..core.files import RunError, atomic_write_text, clear_run_dir, read_json, run_lock, write_json
from ..core.metrics import HEADLINE
from ..core.stats import mean_std
from ..engine import runfiles
from ..models import check_config
from ..reporting.evidence import (MethodRuns, comparison_rows, holm_correct, holm_note, pair_cells, pair_rows,
                                  random_backbone, results_cells, still_improving, sweep_convergence_note, table_cells,
                                  table_notes)
from ..reporting.format import markdown_table
from ..reporting.report import write_sweep_figures, write_sweep_report
from .tune import as_overrides, fixed_split, search
from .workers import worker_pool

LDL = ("kl", "chebyshev", "clark", "canberra", "cosine", "intersection")


@dataclass
class SweepRun:
    dataset: str
    method: str  # the sweep's key of the method
    name: str  # the method's name in tables: its config's ``name``, else the key
    variant: str  # the grid combination, "" without a grid
    seed: int
    configs: list[Path]
    overrides: list[str]
    out: Path


@dataclass
class Sweep:
    """A sweep's runs and the roles of its methods (all optional): ``headline``, compared with every
    other row; ``reference``, which parameters added are counted against; ``pairs``, each [A, B]
    compared on its own."""

    runs: list[SweepRun]
    headline: Optional[str] = None
    reference: Optional[str] = None
    pairs: Sequence[Sequence[str]] = ()
    tune_trials: Optional[int] = None  # every method's trials on validation before its seeds (``tuned``)

    def name_of(self, method: Optional[str]) -> Optional[str]:
        return next((r.name for r in self.runs if r.method == method), None)


SWEEP_KEYS = ("base", "methods", "datasets", "overrides", "grid", "seeds", "headline", "reference", "pairs", "tune",
              "slurm")


def _paths(base: Path, value: Any, key: str) -> list[Path]:
    items = [value] if isinstance(value, str) else list(value or [])
    paths = [(base / p).resolve() for p in items]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"sweep {key}: config file(s) not found: {missing}")
    return paths


def plan(sweep_file: Path, out_dir: Path, extra: Sequence[str] = ()) -> Sweep:
    """Every run of the sweep, in order, with its run directory under ``out_dir/runs``, and the
    methods' roles; ``extra`` overrides (e.g. from the command line) apply to every run, after the
    sweep's own. Every run's settings are checked before the first run starts."""
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
    tune = spec.get("tune")
    if tune is not None and not (isinstance(tune, dict) and set(tune) == {"trials"} and isinstance(tune["trials"], int)
                                 and not isinstance(tune["trials"], bool) and tune["trials"] >= 1):
        raise ConfigError(f"{sweep_file}: tune: {tune!r}; write tune: {{trials: N}}, N >= 1 trials for every method")
    grid = spec.get("grid") or {}
    variants = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    runs = []
    for dataset, dataset_files in datasets.items():
        for method, method_files in methods.items():
            for variant in variants:
                tag = ",".join(f"{k}={v}" for k, v in variant.items())
                for seed in spec.get("seeds") or [0]:
                    configs = [*base, *method_files, *dataset_files]
                    overrides = [*(spec.get("overrides") or []), *extra, *(f"{k}={v}" for k, v in variant.items()),
                                 f"seed={seed}"]
                    cfg = load_config(configs, overrides)
                    check_config(cfg)
                    folder = out_dir / "runs" / dataset / method / (tag or "default") / f"seed{seed}"
                    runs.append(SweepRun(dataset, method, cfg.name or method, tag, int(seed), configs, overrides,
                                         folder))
    return Sweep(runs, spec.get("headline"), spec.get("reference"), spec.get("pairs") or [],
                 tune["trials"] if tune else None)


def tuned(sweep: Sweep, out_dir: Path, workers: int = 1, progress: bool = False) -> Sweep:
    """The sweep's runs with each method's settings tuned on validation first, every method with the
    same number of trials (``tune.trials``): one study per (dataset, method, variant) in
    ``OUT/tuning/<dataset>/<method>/<variant>`` (resumable; ``apps.tune.search``), its best settings
    added to that method's runs. Every run of a dataset, trial or seed, reads one split
    (``OUT/tuning/<dataset>/splits``): the seeds vary the training alone, and no image a trial trained
    or was scored on is a test image of any run. A method with an empty search space, or that trains
    nothing, runs as configured (the probes choose C, Tip-Adapter α and β inside the run, on validation)."""
    runs: list[SweepRun] = []
    splits: dict[str, list[str]] = {}
    for (dataset, method, variant), group in itertools.groupby(sweep.runs, lambda r: (r.dataset, r.method, r.variant)):
        group = list(group)
        first = group[0]
        if dataset not in splits:
            splits[dataset] = fixed_split([str(c) for c in first.configs], first.overrides,
                                          out_dir / "tuning" / dataset / "splits")
        extra = list(splits[dataset])
        cfg = load_config(first.configs, [*first.overrides, *extra])
        if cfg.mode == "train" and cfg.tune.space:
            print(f"tuning {dataset} / {method}{' / ' + variant if variant else ''}: {sweep.tune_trials} trial(s) on "
                  "validation", flush=True)
            found = search(first.configs, [*first.overrides, *extra], out_dir / "tuning" / dataset / method /
                           (variant or "default"), sweep.tune_trials, workers, progress)
            extra += as_overrides(found["best"]["params"])
        runs += [replace(r, overrides=[*r.overrides, *extra]) for r in group]
    return replace(sweep, runs=runs)


def run_status(run: SweepRun) -> str:
    """``done`` (summary.json, written last, is there), ``resume`` (a saved state) or ``new``."""
    if runfiles.is_finished(run.out):
        return "done"
    return "resume" if (run.out / "checkpoints" / "latest.json").is_file() else "new"


def changed_runs(runs: Sequence[SweepRun], rerun_changed: bool = False) -> set[Path]:
    """The run directories (finished or interrupted) made with other settings than the sweep now
    plans, e.g. after its file changed: a ConfigError naming them and the differing keys, or with
    ``rerun_changed`` their set, to be run again from scratch. Used by the SLURM launcher alike."""
    from ..engine.run import resolve_paths

    changed: dict[Path, list[str]] = {}
    for run in runs:
        if run_status(run) == "new":
            continue
        planned = load_config(run.configs, run.overrides)
        resolve_paths(planned)
        try:
            differs = config_differences(runfiles.saved_run_config(run.out), to_dict(planned))
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


def execute(runs: Sequence[SweepRun], progress: bool = True, rerun_changed: bool = False, workers: int = 1,
            figures: bool = True) -> None:
    """Run every run not finished yet: finished ones are skipped, interrupted ones resumed, each run's
    directory locked while a process decides about it and runs it. ``workers`` > 1 runs them in that
    many local processes (:func:`worker_pool`), each run whole in one of them; ``figures`` false leaves
    the runs' figures to ``hclafter report RUN``."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give 1 or more processes")
    changed = changed_runs(runs, rerun_changed)
    jobs = [(f"[{i}/{len(runs)}] {run.dataset} / {run.method}{' / ' + run.variant if run.variant else ''} / "
             f"seed {run.seed}", run, run.out in changed, progress, figures) for i, run in enumerate(runs, start=1)]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _execute_one(*job)
        return
    teachers = [r.out for r in runs if load_config(r.configs, r.overrides).train.distill.teacher not in (None, "fused")]
    if teachers:
        raise ConfigError(f"--workers {workers}: {len(teachers)} run(s) distil from another run (e.g. {teachers[0]}), "
                          "which must finish first; run this sweep with --workers 1")
    _prepare_data(runs)
    order = {run.out: i for i, run in enumerate(longest_first(runs))}
    with worker_pool(min(workers, len(jobs))) as pool:
        for done in [pool.submit(_execute_one, *job) for job in sorted(jobs, key=lambda job: order[job[1].out])]:
            done.result()


def longest_first(runs: Sequence[SweepRun]) -> list[SweepRun]:
    """The runs by step budget (``train.steps``), largest first, the others in their order after them:
    processes that take runs in this order finish together, where a long run taken last would leave
    the others idle (in the demo, the 3200-step ablation, taken eleventh of 13 runs, ran alone for the
    last 73 of 263 s)."""
    steps = {run.out: load_config(run.configs, run.overrides).train.steps or 0 for run in runs}
    return sorted(runs, key=lambda run: -steps[run.out])


def _execute_one(name: str, run: SweepRun, changed: bool, progress: bool, figures: bool) -> None:
    from .runs import train

    with run_lock(run.out):
        status = "new" if changed else run_status(run)
        if status == "done":
            print(f"{name}: done earlier, skipped", flush=True)
            return
        if status == "new":
            clear_run_dir(run.out)  # never reached a saved state, or made with other settings: nothing to keep
        again = " again (its settings changed)" if changed else ""
        print(f"{name}: {'resuming' if status == 'resume' else 'running' + again}", flush=True)
        train(load_config(run.configs, run.overrides), run.out, progress=progress, resume=status == "resume",
              figures=figures)


def _prepare_data(runs: Sequence[SweepRun]) -> None:
    """Each dataset's images (a synthetic world is drawn on first use) made once, here, before the
    workers start, so that no two of them write the same data folder."""
    from ..core.runtime import cache_dir_of
    from ..data import load_splits

    firsts = {}
    for run in runs:
        cfg = load_config(run.configs, run.overrides)
        firsts.setdefault(repr((cfg.data, cfg.seed, cfg.cache_dir)), cfg)
    for cfg in firsts.values():
        load_splits(cfg.data, cfg.seed, cache_dir_of(cfg))


def run_sweep(sweep_file: Path, out_dir: Path, overrides: Sequence[str] = (), progress: bool = True,
              rerun_changed: bool = False, workers: int = 1) -> list[dict]:
    """Run (or finish) every run of the sweep (in ``workers`` local processes), then write the
    results tables and plots."""
    out_dir = Path(out_dir)
    sweep = plan(sweep_file, out_dir, overrides)
    if sweep.tune_trials:
        sweep = tuned(sweep, out_dir, workers, progress)
    execute(sweep.runs, progress, rerun_changed, workers)
    return write_results(sweep, out_dir)


def summarise(runs: Sequence[SweepRun], reference: Optional[str] = None) -> list[dict]:
    """One row per (dataset, method, variant): mean and std over seeds, efficiency, and the
    parameters added relative to the ``reference`` method (None where that means nothing)."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.method, run.name, run.variant), []).append(
            (runfiles.read_summary(run.out), runfiles.read_info(run.out)["efficiency"]))
    rows = []
    for (dataset, method, name, variant), results in groups.items():
        summaries = [s for s, _ in results]
        row: dict[str, Any] = {"dataset": dataset, "method": method, "name": name, "variant": variant,
                               "seeds": len(summaries), "frozen": summaries[0]["epochs"] == 0,
                               "still_improving": still_improving(summaries)}
        for key in HEADLINE:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([s["test"][key] for s in summaries])
        for key in LDL:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([s["test"]["ldl"][key] for s in summaries])
        row["trained_params"] = summaries[0]["parameters"]["trained"]
        row["added_params"] = summaries[0]["parameters"]["added"]
        row["gflops_per_image"] = results[0][1]["gflops_per_image"]
        row["latency_ms_per_image"] = float(np.median([e["latency_ms_per_image"] for _, e in results]))
        rows.append(row)
    base = {(r["dataset"], r["variant"]): r["added_params"] for r in rows if r["method"] == reference}
    for row in rows:
        ref = base.get((row["dataset"], row["variant"]))
        meaningful = ref is not None and not row["frozen"] and row["added_params"] >= ref
        row["added_over_reference"] = row["added_params"] - ref if meaningful else None
    return rows


def _method_groups(runs: Sequence[SweepRun]) -> Iterator[tuple[str, list[SweepRun], list[MethodRuns]]]:
    """Per dataset and variant: its title, its runs and its methods' runs (seeds in sweep order)."""
    for dataset, variant in dict.fromkeys((r.dataset, r.variant) for r in runs):
        group = [r for r in runs if (r.dataset, r.variant) == (dataset, variant)]
        yield (f"{dataset}{' / ' + variant if variant else ''}", group,
               [MethodRuns(m, next(r.name for r in group if r.method == m), [r.out for r in group if r.method == m])
                for m in dict.fromkeys(r.method for r in group)])


def tuning_note(sweep: Sweep) -> str:
    """What a table says about the tuning its rows had: the equal budget, or that there was none."""
    if not sweep.tune_trials:
        return "\nNo method was tuned: every row runs its config's settings.\n"
    return (f"\nTuning budget: every method with a search space was tuned on validation with the same "
            f"{sweep.tune_trials} trial(s) (Optuna TPE, seeded; median pruner; its config's objective) before its "
            "seeds ran (`tuning/`); the others choose their settings on validation inside each run (C, α, β, "
            "ratio) or have none. Every run of a dataset reads one split: the seeds vary the training alone.\n")


def evidence_tables(sweep: Sweep) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The comparison tables of the evidence protocol as (title, header, cells, notes): one per
    dataset and variant against the headline method (if any), then one of the sweep's ``pairs``.
    Every comparison of all the tables is one family for Holm's correction (``holm_correct``)."""
    tables, pair_rows_by_title = [], {}
    for title, group, methods in _method_groups(sweep.runs):
        if sweep.headline:
            tables.append((title, comparison_rows(methods, sweep.headline, sweep.reference), methods, group))
        if sweep.pairs:
            pair_rows_by_title[title] = pair_rows(methods, sweep.pairs)
    family = [r["comparison"] for _, rows, _, _ in tables for r in rows if r["comparison"] is not None]
    family += [r for rows in pair_rows_by_title.values() for r in rows]
    holm_correct(family)
    corrected = f"\n{holm_note(len(family))}\n"
    out = []
    for title, rows, methods, group in tables:
        names = {m.key: m.name for m in methods}
        out.append((title, *table_cells(rows, names[sweep.headline], names.get(sweep.reference)),
                    table_notes(rows, random_backbone(group[0].out)) + corrected + tuning_note(sweep)))
    if sweep.pairs:
        out.append(("Pairwise comparisons", *pair_cells(pair_rows_by_title),
                    "Each pair as in the tables above, with A in the headline's place: Δ is A minus B, pooled "
                    "over seeds, 95 % paired-bootstrap CI over test images; McNemar's exact p; the last column "
                    "says whether A is better, worse or not distinguishable from B at 95 %."
                    + (" † marks a method with runs still improving when training ended (best validation accuracy in "
                       "the last 20 % of the steps more than 0.5 points above the best before)."
                       if any(r["still_improving"] for rows in pair_rows_by_title.values() for r in rows) else "")
                    + "\n" + corrected))
    return out


def write_results(sweep: Sweep, out_dir: Path) -> list[dict]:
    """From the sweep's finished runs: results.csv and results.md (with the comparison tables when
    the sweep names a headline method, and the pairwise ones when it names pairs), sweep.json, the
    plots and report.html; returns the results rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sweep_file(out_dir, sweep)
    done = replace(sweep, runs=[r for r in sweep.runs if runfiles.is_finished(r.out)])
    rows = summarise(done.runs, done.reference)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", table.getvalue())
    tables = evidence_tables(done) if done.headline or done.pairs else []
    comparisons = "\n".join(f"## {title}\n\n" + markdown_table(header, cells) + "\n" + notes
                             for title, header, cells, notes in tables)
    reference = done.name_of(done.reference)
    atomic_write_text(out_dir / "results.md", "# Sweep results (test split, mean ± std over seeds)\n\n" +
                      markdown_table(*results_cells(rows, reference)) +
                      (f"\n{note}\n" if (note := sweep_convergence_note(rows)) else "") +
                      tuning_note(done) +
                      "\nPlots: `plots/accuracy.png`, `plots/train_loss.png`, `plots/learned_weights.png`; all of it "
                      "with every run in `report.html`.\n\n" + comparisons)
    write_sweep_figures(out_dir, rows, done.runs)
    write_sweep_report(out_dir, rows, done.runs, reference, tables)
    return rows


# --- sweep.json: the plan a report of the sweep reads back ----------------------------------------

SWEEP_FILE = "sweep.json"


def write_sweep_file(out_dir: Path, sweep: Sweep) -> None:
    write_json(out_dir / SWEEP_FILE, {"headline": sweep.headline, "reference": sweep.reference,
                                      "pairs": [list(p) for p in sweep.pairs], "tune_trials": sweep.tune_trials,
                                      "runs": [{**asdict(r), "configs": [str(c) for c in r.configs],
                                                "out": str(r.out)} for r in sweep.runs]})


def read_sweep_file(out_dir: Path) -> Sweep:
    """The sweep whose results are in ``out_dir`` (``hclafter report DIR``)."""
    path = Path(out_dir) / SWEEP_FILE
    data = read_json(path)
    try:
        runs = [SweepRun(**{**r, "configs": [Path(c) for c in r["configs"]], "out": Path(r["out"])})
                for r in data["runs"]]
        return Sweep(runs, data["headline"], data["reference"], data["pairs"], data.get("tune_trials"))
    except (KeyError, TypeError) as e:
        raise RunError(f"{path}: not a sweep file of this version of hclafter ({e}); run the sweep command again "
                       "(finished runs are kept) to rewrite it") from None


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / SWEEP_FILE).is_file()
