#!/usr/bin/env python
"""Calibrated copies of the named worlds, by the rule of ``configs/worlds/README.md`` ("Calibrated
worlds"), which reads method-neutral figures on the **validation** split only: the zero-shot
accuracy and the linear probe's (C searched on validation) at the demo's data settings, for every
dose of a world's nuisances on the grid; the chosen dose's world is written as
``resources/worlds/<world>_calibrated.yaml`` and the table as ``docs/worlds_calibration.md``.

    .venv/bin/python scripts/calibrate_worlds.py --out runs/calibration   # resumable: finished runs are kept

No trained method runs here, and no test image is predicted.
"""
from __future__ import annotations

import argparse
import dataclasses
from datetime import date
from pathlib import Path
from typing import Optional, Sequence

import yaml

from hclafter.apps.demo import demo_plan
from hclafter.core.config import load_config
from hclafter.data.world import BOUNDS, Conditions
from hclafter.data.worlds import World, available_worlds, read_world, worlds_dir
from hclafter.engine import runfiles
from hclafter.engine.run import train_run

DOSES = (0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0)
PROBE_BAND = (0.70, 0.85)
ZEROSHOT_FLOOR = 0.25  # twice chance on the eight emotions
SCALED = ("colour_cast", "exposure", "blur", "noise", "clutter")  # sds and a probability: times the dose
COMPOSED = ("light", "gamma")  # stops and exponents: to the power of the dose
FIGURES = {"zeroshot": "zero-shot", "linear_probe": "linear probe"}
DOC = Path(__file__).resolve().parents[1] / "docs" / "worlds_calibration.md"
SUFFIX = "_calibrated"


def dosed(conditions: Conditions, dose: float) -> Conditions:
    """``conditions`` with every nuisance at ``dose`` times its strength, clipped to its range (the
    class signal, mix_rate, swap and cue_keep, unchanged)."""
    values = {name: getattr(conditions, name) * dose for name in SCALED}
    values.update({name: getattr(conditions, name) ** dose for name in COMPOSED})
    return dataclasses.replace(conditions, **{name: min(v, BOUNDS[name][2]) for name, v in values.items()})


def has_nuisance(world: World) -> bool:
    return dosed(world.conditions, 0.5) != world.conditions


def write_world(path: Path, world: World, conditions: Conditions, description: str, why: str) -> None:
    changed = {f.name: getattr(conditions, f.name) for f in dataclasses.fields(Conditions)
               if getattr(conditions, f.name) != f.default}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"description": description, "why": why, "hurts": world.hurts,
                                    "conditions": {k: round(v, 4) for k, v in changed.items()}},
                                   sort_keys=False, width=100), encoding="utf-8")


def val_accuracy(method: str, world_file: Path, out: Path) -> float:
    """The validation accuracy of ``method`` (zero-shot or the linear probe) on the world, seed 0."""
    run = next(r for r in demo_plan(out, 1, "mixed") if r.method == method)
    run_dir = out / "runs" / world_file.stem / method
    if not runfiles.is_finished(run_dir):
        overrides = [*run.overrides, f"data.synthetic.world={world_file}", f"data.root={out / 'data' / world_file.stem}"]
        train_run(load_config(run.configs, overrides), run_dir, progress=False, evaluate_test=False)
    return runfiles.read_summary(run_dir)["val"]["accuracy"]


def choose(figures: dict[float, dict[str, float]]) -> Optional[float]:
    """The smallest dose whose probe accuracy is within the band's top, if it keeps the band's floor
    and the zero-shot floor; None when no dose does."""
    for dose in sorted(figures):
        probe, zeroshot = figures[dose]["linear_probe"], figures[dose]["zeroshot"]
        if probe <= PROBE_BAND[1] + 1e-9:
            return dose if probe >= PROBE_BAND[0] - 1e-9 and zeroshot >= ZEROSHOT_FLOOR else None
    return None


def calibrate(name: str, out: Path) -> tuple[dict, Optional[float]]:
    world = read_world(name)
    figures = {}
    for dose in DOSES:
        world_file = out / "worlds" / f"{name}_d{dose:g}.yaml"
        write_world(world_file, world, dosed(world.conditions, dose), world.description, f"{name} at dose {dose:g}")
        figures[dose] = {m: val_accuracy(m, world_file, out) for m in FIGURES}
        print(f"{name} dose {dose:g}: " + ", ".join(f"{FIGURES[m]} {100 * a:.1f} %" for m, a in figures[dose].items()),
              flush=True)
    dose = choose(figures)
    if dose is not None:
        table = "; ".join(f"{d:g}: probe {100 * f['linear_probe']:.1f} %, zero-shot {100 * f['zeroshot']:.1f} %"
                          for d, f in figures.items())
        why = (f"{name} with every nuisance at {dose:g} times its dose (scripts/calibrate_worlds.py, "
               f"{date.today().isoformat()}), the smallest dose of the grid whose linear-probe validation accuracy "
               f"is at most {100 * PROBE_BAND[1]:.0f} % (configs/worlds/README.md, 'Calibrated worlds'). Validation "
               f"accuracies by dose: {table}. Original: {world.why}")
        description = (f"The world {name} with every nuisance at {dose:g} times its dose, calibrated on validation "
                       "figures (configs/worlds/README.md).")
        write_world(worlds_dir() / f"{name}{SUFFIX}.yaml", world, dosed(world.conditions, dose), description, why)
    return figures, dose


def write_doc(results: dict) -> None:
    lines = ["# Calibrated worlds: the figures behind them", "",
             f"`scripts/calibrate_worlds.py`, {date.today().isoformat()}, by the rule of `configs/worlds/README.md`: "
             "validation accuracy (%) of zero-shot CLIP / the linear probe at each dose of the world's nuisances "
             "(the demo's data settings, the shipped toy CLIP, seed 0). **Bold**: the chosen dose.", "",
             "| world | " + " | ".join(f"dose {d:g}" for d in DOSES) + " | chosen |",
             "|---|" + "---:|" * len(DOSES) + "---|"]
    for name, (figures, chosen) in results.items():
        cells = []
        for d in DOSES:
            cell = f"{100 * figures[d]['zeroshot']:.1f} / {100 * figures[d]['linear_probe']:.1f}"
            cells.append(f"**{cell}**" if d == chosen else cell)
        verdict = f"`{name}{SUFFIX}` (dose {chosen:g})" if chosen is not None else "none qualifies: not calibrated"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/calibration"), help="working folder (runs, worlds)")
    args = parser.parse_args(argv)
    names = [n for n in available_worlds() if not n.endswith(SUFFIX) and has_nuisance(read_world(n))]
    results = {name: calibrate(name, args.out.resolve()) for name in names}
    write_doc(results)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
