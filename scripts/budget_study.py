#!/usr/bin/env python
"""The demo's step budgets (SPEC §11): validation accuracy against optimizer steps for every method
of the demo that trains, on the demo world, seed 0, **validation split only** (no run predicts
test), and the rule that turns the curves into the budgets of ``resources/demo_budgets.yaml``.

    .venv/bin/python scripts/budget_study.py --out runs/budget_study --budgets 100 200 400 --extend-to 3200

(the study behind ``resources/demo_budgets.yaml``, run on 2026-12-05 with the toy CLIP in 8-pixel patches, first
with ``--extend-to 1600``, then 3200 since four methods were still best at 1600; resumable: finished runs are kept)

Each method trains once per budget of ``--budgets`` (separate runs: the cosine schedule ends at the
budget, so a long run's early validations are not what a short run reaches). The rule, fixed before
any run was looked at: a method's budget is the smallest one whose run is *converged* (SPEC §11) and
whose best validation accuracy is within one validation image of the best over all its budgets; if
no budget qualifies, the largest. Added after the first runs (on validation figures only), since
CLIP-Adapter was best at the grid's largest budget: while a method's largest budget is strictly its
best, it trains again with twice as many steps, up to ``--extend-to``. Writes ``budget_study.json``
(every run's curve and verdict, the chosen budgets), ``budget_study.png`` (one panel per method) and
prints the chosen budgets.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence

from hclafter.apps.demo import demo_plan
from hclafter.core.config import load_config
from hclafter.core.files import write_json
from hclafter.core.metrics import CONVERGED
from hclafter.engine import runfiles
from hclafter.engine.run import train_run
from hclafter.models import method_class
from hclafter.reporting.plots import plt, save_figure

WORLD, SEED = "mixed", 0


def train_once(method: str, budget: int, configs: list, overrides: list, run_dir: Path) -> dict:
    """One run of the study (trained unless finished): its validation curve, best accuracy and verdict."""
    if not runfiles.is_finished(run_dir):
        started = time.time()
        train_run(load_config(configs, [*overrides, f"train.steps={budget}"]), run_dir, progress=False,
                  evaluate_test=False)
        print(f"{method} {budget} steps: {time.time() - started:.0f} s", flush=True)
    summary = runfiles.read_summary(run_dir)
    return {"curve": [(r["step"], r["val_accuracy"]) for r in runfiles.read_records(run_dir)],
            "best_val_accuracy": summary["val"]["accuracy"], "verdict": summary["convergence"]["verdict"],
            "val_images": summary["num_samples"]["val"]}


def run_all(out: Path, budgets: Sequence[int], extend_to: int, methods: Sequence[str] = ()) -> dict:
    """Every trained demo method (or those of ``methods``, in that order) at every budget, and the
    extensions of the module docstring."""
    results: dict = {}
    plan = {run.method: run for run in demo_plan(out, 1, WORLD)}
    for method in methods or plan:
        run = plan[method]
        cfg = load_config(run.configs, run.overrides)
        if cfg.mode != "train" or not method_class(cfg.model.method).trained_by_gradient:
            continue
        runs = results[run.method] = {}
        for budget in budgets:
            runs[budget] = train_once(run.method, budget, run.configs, run.overrides,
                                      out / "runs" / run.method / f"steps{budget}")
        while 2 * max(runs) <= extend_to and _best_budget(runs) == max(runs):
            budget = 2 * max(runs)
            runs[budget] = train_once(run.method, budget, run.configs, run.overrides,
                                      out / "runs" / run.method / f"steps{budget}")
    return results


def _best_budget(runs: dict) -> int:
    """The budget of the best validation accuracy (the smallest on ties)."""
    return max(sorted(runs), key=lambda b: runs[b]["best_val_accuracy"])


def choose(runs: dict) -> int:
    """The rule of the module docstring, for one method's runs {budget: result}."""
    best = max(r["best_val_accuracy"] for r in runs.values())
    image = 1 / next(iter(runs.values()))["val_images"]
    good = [b for b, r in sorted(runs.items())
            if r["verdict"] == CONVERGED and r["best_val_accuracy"] >= best - image - 1e-9]  # 1e-9: k/n rounding
    return good[0] if good else max(runs)


def plot(results: dict, chosen: dict, path: Path) -> None:
    """One panel per method: the validation curve of every budget, the chosen one drawn thick."""
    cols = 4
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=True)
    for ax, (method, runs) in zip(axes.flat, results.items()):
        for budget, r in sorted(runs.items()):
            steps, acc = zip(*r["curve"])
            label = (f"{budget}{' (chosen)' if budget == chosen[method] else ''}"
                     f"{'' if r['verdict'] == CONVERGED else ' †'}")
            ax.plot(steps, [100 * a for a in acc], linewidth=2.5 if budget == chosen[method] else 1, label=label)
        ax.set_xscale("log")
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("optimizer steps")
        ax.legend(fontsize=7, title="budget", title_fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy %")
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.suptitle(f"Validation accuracy against steps, demo world '{WORLD}', seed {SEED} († still improving)")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/budget_study", help="output folder (runs, figure, JSON)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 400, 800],
                        help="step budgets to train each method with")
    parser.add_argument("--extend-to", type=int, default=0,
                        help="double a method's largest budget while it is strictly its best, up to this many steps")
    parser.add_argument("--methods", nargs="+", default=(), help="only these demo methods (to split the study "
                        "among processes; the figure and the choices then cover these alone)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = run_all(out, sorted(set(args.budgets)), args.extend_to, args.methods)
    chosen = {method: choose(runs) for method, runs in results.items()}
    write_json(out / "budget_study.json", {"world": WORLD, "seed": SEED, "budgets": sorted(set(args.budgets)),
                                           "extend_to": args.extend_to, "chosen": chosen, "runs": results})
    plot(results, chosen, out / "budget_study.png")
    print("\n".join(f"{method}: {budget}" for method, budget in chosen.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
