"""hclafter demo: every method, the field's baselines and the capacity-matched control on a synthetic
emotion world, with a small aligned CLIP, over several seeds, and a table that follows the evidence
protocol.

The demo is a sweep: zero-shot CLIP, the text-only classifier, the linear probe, Tip-Adapter-F,
CLIP-Adapter, CoOp, LaFTer (label-free), LaFTer-sup, the capacity-matched control LaFTer-sup +
adapter, HybridCascade-LaFTer and the Cascade-CLIP-style baseline (with ``ablations``, two of the
hybrid's ablations too), each with its own method config and the shipped toy CLIP, on a named world
(default: mixed, which hurts global and fine cues alike). It prints the table
(mean ± std over seeds, paired differences with the headline method, verdicts) and writes a
Markdown and an HTML report. Nothing is downloaded. The world is synthetic: its numbers show the
methods working end to end, not what they achieve on real photographs.
"""
from __future__ import annotations

import argparse
import json
import textwrap
import time
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import yaml

from ..core.config import Config, load_config
from ..core.files import atomic_write_text, write_json
from ..core.runtime import cache_dir_of
from ..data import DatasetSplits, load_splits
from ..data.images import load_rgb
from ..data.worlds import DEFAULT_WORLD, available_worlds, read_world
from ..engine import runfiles
from ..reporting.evidence import (MethodRuns, comparison_rows, convergence_note, holm_correct, holm_note, marked,
                                  random_backbone, table_cells, table_notes)
from ..reporting.format import difference, markdown_table, pm
from ..reporting.html import Figure, Section, write_html
from ..reporting.plots import plt, save_figure
from ..reporting.report import comparison_tables
from .sweep import SweepRun, execute

# Zero-shot accuracy of the shipped toy CLIP on the demo's test split of the "wild" world (the data
# it was measured on when it was trained, 150 images per class), as
# `zeroshot_eval(demo_config(world="wild"), "test")` gives it on CPU; README's quick start shows it too.
TOY_CLIP_ZEROSHOT_ACCURACY = 0.608
# The demo's rows, in table order (method configs of resources/methods/).
METHODS = ("zeroshot", "textonly", "linear_probe", "tip_adapter_f", "clip_adapter", "coop", "lafter_pseudo", "lafter",
           "lafter_adapter", "hybrid", "cascadeclip")
HEADLINE, REFERENCE = "hybrid", "lafter"
# The verdicts beneath the table: the headline against the capacity-matched control, and against the
# strongest baseline, i.e. the row with the best mean validation accuracy (never test) that is neither
# the headline, the control nor one of the headline's ablations.
CONTROL = "lafter_adapter"
# Rows after the headline's with --ablations: is it the layers or the adapter capacity? Not run by
# default since they took 36 % of the demo's time (the no-adapter ablation needs 3200 steps), which
# kept `make demo` above its 8 minutes (BENCHMARKS.md, issue 23).
ABLATIONS = ("hybrid_no_adapters", "hybrid_shared_adapter")


def demo_methods(ablations: bool = False) -> tuple[str, ...]:
    """The demo's rows in table order, the ablations (when asked for) after the headline's."""
    if not ablations:
        return METHODS
    at = METHODS.index(HEADLINE) + 1
    return METHODS[:at] + ABLATIONS + METHODS[at:]


def _resource(*parts: str) -> Path:
    return Path(str(resources.files("hclafter").joinpath("resources", *parts)))


def toy_clip_dir() -> Path:
    return _resource("toy_clip")


def toy_clip_model_cfg() -> dict[str, Any]:
    return json.loads((toy_clip_dir() / "config.json").read_text(encoding="utf-8"))


def demo_descriptions() -> Path:
    return _resource("descriptions", "demo_world.json")


def demo_config_file() -> Path:
    """The demo's settings, shipped with the package."""
    return _resource("demo.yaml")


def method_config_file(method: str) -> Path:
    return _resource("methods", f"{method}.yaml")


def demo_budgets() -> dict[str, int]:
    """Optimizer steps (``train.steps``) of each demo method that trains: resources/demo_budgets.yaml,
    fixed on validation by scripts/budget_study.py."""
    path = _resource("demo_budgets.yaml")
    budgets = yaml.safe_load(path.read_text(encoding="utf-8"))
    known = demo_methods(ablations=True)
    unknown = set(budgets) - set(known)
    if unknown:
        raise ValueError(f"{path}: {sorted(unknown)} are not demo methods ({', '.join(known)})")
    return budgets


def _demo_run(out_dir: Optional[Path], weights: Optional[Path], device: str, method: str, seed: int,
              world: str) -> tuple[list[Path], list[str]]:
    """Config files and overrides of one demo run: the method's config, then the demo's settings
    (which replace the method's prompt count, learning rates and data), its step budget, the shipped
    files, the world. No TensorBoard events: the demo reads metrics.jsonl, and logging each step took
    4 % of a run's time (BENCHMARKS.md, issue 23)."""
    budget = demo_budgets().get(method)
    overrides = [f"device={device}", "backbone.name=toy-clip", f"seed={seed}", "train.log_with=[]",
                 *([] if budget is None else [f"train.steps={budget}"]),
                 f"backbone.pretrained={weights or toy_clip_dir() / 'toy_clip.safetensors'}",
                 f"text.descriptions={demo_descriptions()}", f"data.synthetic.world={world}",
                 f"backbone.model_cfg={yaml.safe_dump(toy_clip_model_cfg(), default_flow_style=True).strip()}"]
    if out_dir is not None:
        overrides += [f"cache_dir={Path(out_dir) / 'cache'}", f"data.root={Path(out_dir) / 'data' / world}"]
    return [method_config_file(method), demo_config_file()], overrides


def demo_config(out_dir: Optional[Path] = None, weights: Optional[Path] = None, device: str = "auto",
                method: str = HEADLINE, seed: int = 0, world: str = DEFAULT_WORLD) -> Config:
    """The demo's config for one method (a name of resources/methods/) and seed."""
    return load_config(*_demo_run(out_dir, weights, device, method, seed, world))


def demo_plan(out: Path, seeds: int, world: str, weights: Optional[Path] = None, device: str = "auto",
              methods: Sequence[str] = METHODS) -> list[SweepRun]:
    """Every run of the demo, seed by seed, as sweep runs under ``out/runs/<world>/<method>/seed<k>``."""
    runs = []
    for seed in range(seeds):
        for method in methods:
            configs, overrides = _demo_run(out, weights, device, method, seed, world)
            runs.append(SweepRun(world, method, load_config(configs, overrides).name or method, "", seed, configs,
                                 overrides, out / "runs" / world / method / f"seed{seed}"))
    return runs


# --- report ------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict], chance: float) -> str:
    """The table for a terminal: mean ± std, and the verdict against the headline method."""
    head = f"{'method':<28}{'accuracy %':>14}{'macro-F1 %':>14}{'KL cal.':>9}  {'Δ acc [95 % CI]':<22}verdict"
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        c = r["comparison"]
        diff = "" if c is None else difference(c["difference"], c["ci"])
        lines.append(f"{marked(r['method'], r):<28}{pm(r['accuracy'], 100):>14}{pm(r['macro_f1'], 100):>14}"
                     f"{r['kl_calibrated'][0]:>9.3f}  "
                     f"{diff:<22}{'(headline)' if c is None else c['verdict']}")
    lines.append(f"chance accuracy: {100 * chance:.1f} %")
    note = convergence_note(rows)
    return "\n".join(lines + ([textwrap.fill(note, len(head) + 20)] if note else []))


def strongest_baseline(rows: Sequence[dict]) -> dict:
    """The baseline row with the best mean validation accuracy."""
    return max((r for r in rows if r["key"] not in (HEADLINE, CONTROL, *ABLATIONS)), key=lambda r: r["val_accuracy"][0])


def verdicts(rows: Sequence[dict]) -> list[str]:
    """The headline against the strongest baseline and against the capacity-matched control, one line each."""
    by_key = {r["key"]: r for r in rows}
    strongest = strongest_baseline(rows)
    lines = []
    for label, r in ((f"the strongest baseline (best validation accuracy, {pm(strongest['val_accuracy'], 100)} %)",
                      strongest), ("the capacity-matched control", by_key[CONTROL])):
        c = r["comparison"]
        lines.append(f"{by_key[HEADLINE]['method']} vs {label}, {r['method']}: Δ accuracy "
                     f"{difference(c['difference'], c['ci'])} points, McNemar p {c['p_value']:.3g}"
                     + (f", Holm p {c['p_holm']:.3g}" if "p_holm" in c else "") + f": {c['verdict']}.")
    return lines


def plot_comparison(rows: Sequence[dict], chance: float, path: Path, world: str) -> None:
    """Accuracy and macro-F1 per method, mean with the std over seeds as error bars: horizontal bars,
    one method per line in table order, so the names and the value labels never overlap."""
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(rows)))
    y = np.arange(len(rows))
    for offset, key, label in ((-0.2, "accuracy", "accuracy"), (0.2, "macro_f1", "macro-F1")):
        means = [r[key][0] for r in rows]
        stds = [0.0 if np.isnan(r[key][1]) else r[key][1] for r in rows]
        bars = ax.barh(y + offset, means, height=0.4, xerr=stds, capsize=2, label=label)
        ax.bar_label(bars, labels=[f"{m:.2f} ± {s:.2f}" for m, s in zip(means, stds)], fontsize=7, padding=3)
    ax.axvline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    ax.set_yticks(y, [r["method"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18)
    ax.set_title(f"Test split of the synthetic world '{world}' (toy CLIP), mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def _save_world_samples(data: DatasetSplits, path: Path, per_class: int = 8) -> None:
    """The first ``per_class`` test images of every emotion, one row each, labelled with the emotion."""
    classes = data.wheel.classes
    by_class: dict[int, list[np.ndarray]] = {c: [] for c in range(len(classes))}
    for s in data["test"]:
        if len(by_class[s.label]) < per_class:
            by_class[s.label].append(np.asarray(load_rgb(s.path)))
    shown = [c for c in range(len(classes)) if by_class[c]]
    fig, axes = plt.subplots(len(shown), 1, figsize=(1.0 * per_class + 1.2, 1.05 * len(shown)), squeeze=False)
    for ax, c in zip(axes[:, 0], shown):
        ax.imshow(np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in by_class[c]],
                                 axis=1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(classes[c], rotation=0, ha="right", va="center", fontsize=10)
    save_figure(fig, path)


def _notes(rows: Sequence[dict], info: dict) -> str:
    """The table's notes, with Holm's correction stated where the verdicts read it."""
    corrected = [r["comparison"] for r in rows if r["comparison"] is not None and "p_holm" in r["comparison"]]
    return table_notes(rows, info["random_backbone"]) + (f"\n{holm_note(len(corrected))}\n" if corrected else "")


def write_demo_report(out: Path, rows: Sequence[dict], chance: float, info: dict) -> Path:
    """report.md: what the data are, the table with its notes, the figures."""
    world = info["world"]
    n = info["num_samples"]
    names = {r["key"]: r["method"] for r in rows}
    header, cells = table_cells(rows, names[HEADLINE], names[REFERENCE])
    text = f"""# hclafter demo report

**The data are synthetic.** Images come from `hclafter.data.world`, a seeded generator in which each
Mikels-8 emotion is carried by one family of visual cues (colour, brightness, shapes, a simple
scene and a fine texture), with ambiguity between wheel neighbours; every image has its own
vote distribution. The images are taken under the world **{world}**: {info['world_description']}
The backbone is the toy CLIP shipped with hclafter (12 image blocks, 32-pixel images in 8-pixel patches), pre-trained
on clean captioned images of the same world, drawn from other seeds. The numbers show the methods
working end to end; they say nothing about real photographs.

Dataset: {n['train']} train / {n['val']} val / {n['test']} test images, {len(info['classes'])} classes
({', '.join(info['classes'])}); checkpoints selected on val; {info['seeds']} training seeds (the images fixed).
Headline method: {names[HEADLINE]}; parameters added are counted against {names[REFERENCE]}.
Time: {info['time_s']:.0f} s for this invocation (runs finished by an earlier one are reused, not run again);
the runs' own wall times add up to {info['runs_wall_s']:.0f} s, in {info['workers']} process(es).

{markdown_table(header, cells)}
{_notes(rows, info)}
{chr(10).join(f"- {line}" for line in verdicts(rows))}

Chance accuracy: {100 * chance:.1f} %. The table claims nothing beyond these images and this backbone.

![accuracy per method](plots/accuracy.png)

Example test images, one emotion per row ({', '.join(info['classes'])}):

![world samples](plots/world_samples.png)

Runs (configs, metrics per epoch, predictions): `runs/{world}/<method>/seed<k>/`; `hclafter report` on one
draws its confusion matrices and curves.

Re-run: `hclafter demo --out {out} --world {world} --seeds {info['seeds']}{' --ablations' * info['ablations']}`; other worlds:
{', '.join(info['worlds'])}; train on real data: see README ("Running on real data").
"""
    path = out / "report.md"
    atomic_write_text(path, text)
    intro, notes = text.split("\n\n| method")[0].split("\n", 2)[2], _notes(rows, info)
    write_html(out / "report.html", "hclafter demo report", [
        Section("Results", [*intro.split("\n\n"),
                            *comparison_tables(header, cells, f"Test split, world {world}"),
                            *notes.split("\n\n"), *verdicts(rows),
                            f"Chance accuracy: {100 * chance:.1f} %. The table claims nothing beyond these images and "
                            "this backbone."]),
        Section("Figures", [Figure(out / "plots" / "accuracy.png", "Accuracy and macro-F1 per method, mean ± std"),
                            Figure(out / "plots" / "world_samples.png", "Example test images, one emotion per row")]),
    ], subtitle=f"{len(rows)} methods × {info['seeds']} seed(s), synthetic world **{world}**")
    return path


# --- the demo ----------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, flush=True)


def run_demo(out: Path, device: str = "auto", progress: bool = True, weights: Optional[Path] = None, seeds: int = 3,
             world: str = DEFAULT_WORLD, workers: int = 1, ablations: bool = False) -> dict:
    """Everything ``hclafter demo`` does; returns the results (also written to ``out/results.json``).
    Finished runs of an earlier demo with the same settings are reused. The runs go through
    ``workers`` local processes and draw no figures of their own (the report needs none of them;
    ``hclafter report RUN`` draws a run's).

    ``weights``: another toy-CLIP weights file (e.g. one written by ``scripts/train_toy_clip.py``);
    ``ablations``: two of the hybrid's ablations as rows too.
    """
    started = time.time()
    out = Path(out).resolve()
    description = read_world(world).description
    cfg = demo_config(out, weights, device, world=world)
    keys = demo_methods(ablations)
    _say(f"hclafter demo: {len(keys)} methods x {seeds} seed(s) with a small CLIP on a SYNTHETIC emotion world "
         f"({world}: {description})\n(shipped weights, no download; the numbers show the methods working, "
         "not real-photo results)")
    data = load_splits(cfg.data, cfg.seed, cache_dir_of(cfg))
    _say(" / ".join(f"{len(data[s])} {s}" for s in ("train", "val", "test")) + " images")
    runs = demo_plan(out, seeds, world, weights, device, keys)
    execute(runs, progress, workers=workers, figures=False)
    methods = [MethodRuns(m, next(r.name for r in runs if r.method == m), [r.out for r in runs if r.method == m])
               for m in keys]
    rows = comparison_rows(methods, HEADLINE, REFERENCE)
    holm_correct([r["comparison"] for r in rows if r["comparison"] is not None])
    chance = 1.0 / data.wheel.num_classes
    info = {"world": world, "world_description": description, "worlds": available_worlds(), "seeds": seeds,
            "classes": list(data.wheel.classes), "num_samples": {s: len(data[s]) for s in ("train", "val", "test")},
            "random_backbone": random_backbone(runs[0].out), "workers": workers, "ablations": ablations,
            "runs_wall_s": sum(runfiles.read_info(r.out)["wall_time_s"] for r in runs)}
    plot_comparison(rows, chance, out / "plots" / "accuracy.png", world)
    _save_world_samples(data, out / "plots" / "world_samples.png")
    info["time_s"] = time.time() - started
    report = write_demo_report(out, rows, chance, info)
    results = {"rows": rows, "chance": chance, **info}
    write_json(out / "results.json", results)
    _say("\n" + format_table(rows, chance) + "\n" + "\n".join(textwrap.fill(v, 116) for v in verdicts(rows)))
    _say(f"\nreport: {report}   ({info['time_s']:.0f}s in all)")
    return results


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), device=args.device, progress=not args.quiet, seeds=args.seeds,
             world=args.world or DEFAULT_WORLD, workers=args.workers, ablations=args.ablations)
    return 0
