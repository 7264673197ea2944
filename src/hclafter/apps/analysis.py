"""What each layer and stage knows (SPEC §10): the seed's feature representation analysis.

Linear probes on the frozen, un-prompted tower's CLS feature after every block (mapped through
ln_post/proj, as the stages see it) show how much of the label is linearly readable at each
depth; the trained stages' test accuracies, placed at each stage's deepest block, show what the
method made of it. Per-stage per-class accuracy and the images where the fused prediction is wrong
but some stage is right show where the stages differ, which a single accuracy hides.
"""
from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..core.files import RunError, atomic_write_bytes, atomic_write_text, write_json
from ..core.runtime import cache_dir_of
from ..data import EmotionImages, eval_loader, load_split_files
from ..engine import runfiles
from ..engine.evaluation import predict
from ..engine.inference import TrainedRun, load_run
from ..engine.inputs import cached_datasets
from ..models.backbone import backbone_from_config
from ..models.hybrid import HybridCascadeLaFTer
from ..models.vit import check_vit
from ..reporting.evidence import random_backbone
from ..reporting.plots import plt

__all__ = ["analyze_run", "format_markdown", "probe_blocks", "stage_breakdown"]

PROBE_MAX_ITER = 2000
MEANINGLESS = ("**The backbone is random-initialised: these numbers mean nothing** about CLIP or the method; "
               "they only show the analysis working.")


def probe_blocks(run: TrainedRun, train: EmotionImages, test: EmotionImages, progress: bool = True) -> list[dict]:
    """Test accuracy of a logistic-regression probe on the CLS feature after each block 1..L.

    The tower is rebuilt from the run's backbone identity: the run's own tower may hold tuned
    LayerNorms, and the probes measure the pre-trained one. Features go through the feature cache
    (keyed by backbone identity, blocks, transform and files), so a second analysis reads them back.
    """
    backbone = backbone_from_config(run.cfg.backbone)
    if backbone.identity != run.backbone.identity:
        raise RunError(f"{run.run_dir}: the backbone rebuilt for the probes differs from the run's")
    depth = check_vit(backbone.model.visual)
    tower = HybridCascadeLaFTer(backbone, run.wheel.num_classes, prompt_tokens=0,
                                stages=[[block] for block in range(1, depth + 1)], stage_adapters=False)
    device = run.runtime.device
    cached = cached_datasets(tower.to(device), {"train": train, "test": test}, run.wheel, backbone,
                             cache_dir_of(run.cfg), run.cfg.data.eval_batch_size, device, progress)
    x = {split: np.asarray(ds.features)[ds.rows] for split, ds in cached.items()}  # [N, L, D]
    y = {split: np.array([s.label for s in ds.samples]) for split, ds in (("train", train), ("test", test))}
    rows = []
    for block in range(depth):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=run.cfg.seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded per block instead
            probe.fit(x["train"][:, block], y["train"])
        converged = bool(probe[-1].n_iter_.max() < PROBE_MAX_ITER)
        rows.append({"block": block + 1, "accuracy": float(probe.score(x["test"][:, block], y["test"])),
                     "converged": converged})
    return rows


def stage_breakdown(run: TrainedRun, test: EmotionImages, progress: bool = True) -> dict:
    """Per class: the fused and each stage's test accuracy of the trained model, and the images
    where the stages disagree or where the fused prediction is wrong but some stage is right."""
    def classify(images):
        with run.runtime.autocast():
            out = run.model.forward_stages(images)
        return out.logits, out.stage_logits

    preds = predict(classify, eval_loader(test, run.cfg.data, run.runtime), run.runtime, desc="stages",
                    progress=progress)
    labels, fused = preds.labels, preds.logits.argmax(1)
    stage = preds.stage_logits.argmax(-1)  # [S, N]
    stage_right = stage == labels[None]
    disagree = (stage != stage[:1]).any(0)
    rescued = (fused != labels) & stage_right.any(0)  # fused wrong, some stage right
    rows = []
    for c, name in enumerate(run.wheel.classes):
        m = labels == c
        n = int(m.sum())
        rows.append({"class": name, "images": n,
                     "fused": float((fused[m] == c).mean()) if n else None,
                     "stages": [float(r[m].mean()) if n else None for r in stage_right],
                     "stages_disagree": int(disagree[m].sum()), "fused_wrong_some_stage_right": int(rescued[m].sum()),
                     "right_by_stage": [int((r & rescued)[m].sum()) for r in stage_right]})
    total = {"class": "all", "images": int(len(labels)), "fused": float((fused == labels).mean()),
             "stages": [float(r.mean()) for r in stage_right], "stages_disagree": int(disagree.sum()),
             "fused_wrong_some_stage_right": int(rescued.sum()),
             "right_by_stage": [int((r & rescued).sum()) for r in stage_right]}
    return {"per_class": rows, "all": total}


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _stage_name(s: int, blocks: list[int]) -> str:
    if len(blocks) == 1:
        return f"stage {s + 1} (block {blocks[0]})"
    consecutive = blocks == list(range(blocks[0], blocks[-1] + 1))
    return f"stage {s + 1} (blocks {f'{blocks[0]}–{blocks[-1]}' if consecutive else ','.join(map(str, blocks))})"


def format_markdown(result: dict) -> str:
    """The analysis as Markdown: probes beside the trained stages, per-class stage accuracy, disagreements."""
    stages = result["stages"]
    names = [_stage_name(s, st["blocks"]) for s, st in enumerate(stages)]
    lines = [f"# What each layer and stage knows: {result['name']}", ""]
    if result["random_init"]:
        lines += [MEANINGLESS, ""]
    lines += [f"Run `{result['run']}` ({result['method']}, backbone {result['backbone']}); probes fitted on "
              f"{result['train_images']} train images, everything scored on {result['test_images']} test images; "
              f"accuracy in %, chance {100 * result['chance']:.1f}.", "",
              "## Linear probes per block beside the trained stages", "",
              "Probe: logistic regression on the frozen, un-prompted tower's CLS feature after the block (through "
              "ln_post/proj). Trained stage: the run's test accuracy of the stage, at its deepest block.", "",
              "| block | probe | trained stage |", "|---:|---:|---|"]
    at_block = {st["deepest_block"]: f"{names[s]}: {_pct(st['test_accuracy'])}" for s, st in enumerate(stages)}
    for row in result["probe"]:
        note = "" if row["converged"] else " (not converged)"
        lines.append(f"| {row['block']} | {_pct(row['accuracy'])}{note} | {at_block.get(row['block'], '')} |")
    lines += ["", f"Fused (trained model): {_pct(result['fused_test_accuracy'])}.", "",
              "## Per-stage per-class test accuracy", "",
              "| class | images | fused | " + " | ".join(names) + " |", "|---|---:|---:|" + "---:|" * len(names)]
    b = result["breakdown"]
    for row in [*b["per_class"], b["all"]]:
        lines.append(f"| {row['class']} | {row['images']} | {_pct(row['fused'])} | "
                     + " | ".join(_pct(a) for a in row["stages"]) + " |")
    lines += ["", "## Where stages disagree", "",
              "Images whose stages predict different classes, and those where the fused prediction is wrong but "
              "some stage is right (with how many of these each stage gets right).", "",
              "| class | images | stages disagree | fused wrong, some stage right | "
              + " | ".join(f"right by stage {s + 1}" for s in range(len(names))) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(names)]
    for row in [*b["per_class"], b["all"]]:
        lines.append(f"| {row['class']} | {row['images']} | {row['stages_disagree']} | "
                     f"{row['fused_wrong_some_stage_right']} | " + " | ".join(map(str, row["right_by_stage"])) + " |")
    return "\n".join(lines) + "\n"


def plot_analysis(result: dict, stem: Path) -> list[Path]:
    """Probe accuracy per block with the trained stages (a bar over each stage's blocks, a marker at
    its deepest), the fused accuracy and chance; written as PNG and SVG."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    blocks = [r["block"] for r in result["probe"]]
    ax.plot(blocks, [r["accuracy"] for r in result["probe"]], marker="o", color="tab:blue",
            label="linear probe, frozen tower")
    for s, st in enumerate(result["stages"]):
        if st["test_accuracy"] is None:
            continue
        ax.hlines(st["test_accuracy"], min(st["blocks"]) - 0.3, max(st["blocks"]) + 0.3, color="tab:red", alpha=0.5,
                  linewidth=4)
        ax.plot([st["deepest_block"]], [st["test_accuracy"]], marker="s", linestyle="none", color="tab:red",
                label="trained stage (its blocks)" if s == 0 else None)
        ax.annotate(f"S{s + 1}", (st["deepest_block"], st["test_accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color="tab:red")
    if result["fused_test_accuracy"] is not None:
        ax.axhline(result["fused_test_accuracy"], color="tab:red", linestyle="--", linewidth=1, label="fused (trained)")
    ax.axhline(result["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    title = f"What each block knows: {result['name']}"
    if result["random_init"]:
        title += "\n(random-initialised backbone: these numbers mean nothing)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    fig.tight_layout()
    paths = []
    for fmt in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=120, bbox_inches="tight")
        path = stem.with_suffix(f".{fmt}")
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def analyze_run(run_dir: str | Path, out: Optional[str | Path] = None, device: Optional[str] = None,
                progress: bool = True) -> dict:
    """Probes per block, the trained stages, per-stage per-class accuracy and stage disagreements of a
    finished run, on its own saved train/test splits; written to ``out`` (default ``RUN/analysis``) as
    analysis.md, analysis.json, probe_curve.csv and probe.png/.svg. Returns the JSON's content."""
    run = load_run(run_dir, device)
    out = Path(out) if out is not None else run.run_dir / "analysis"
    data = load_split_files(run.run_dir / "splits", run.wheel)
    missing = [s for s in ("train", "test") if not data.splits.get(s)]
    if missing:
        raise RunError(f"{run.run_dir}/splits: no {' or '.join(missing)} split to analyse ({missing[0]}.csv)")
    if not runfiles.is_finished(run.run_dir):
        raise RunError(f"{run.run_dir} is not a finished run: {runfiles.SUMMARY} is missing")
    summary = runfiles.read_summary(run.run_dir)["test"]
    # Labels only: the images' own distributions play no part here.
    train, test = (EmotionImages(data[s], run.wheel, run.backbone.preprocess) for s in ("train", "test"))
    stage_acc = summary.get("stage_accuracy") or []
    stages = [{"blocks": sorted(blocks), "deepest_block": max(blocks),
               "test_accuracy": stage_acc[s] if s < len(stage_acc) else None}
              for s, blocks in enumerate(run.cfg.model.stages)]
    result = {"run": str(run.run_dir), "name": run.cfg.name or run.cfg.model.method, "method": run.cfg.model.method,
              "backbone": run.cfg.backbone.name, "random_init": random_backbone(run.run_dir),
              "classes": list(run.wheel.classes), "chance": 1.0 / run.wheel.num_classes,
              "train_images": len(train), "test_images": len(test),
              "probe": probe_blocks(run, train, test, progress), "probe_model": {
                  "classifier": "StandardScaler + LogisticRegression (lbfgs)", "max_iter": PROBE_MAX_ITER,
                  "random_state": run.cfg.seed},
              "stages": stages, "fused_test_accuracy": summary.get("accuracy"),
              "breakdown": stage_breakdown(run, test, progress)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "analysis.json", result)
    atomic_write_text(out / "analysis.md", format_markdown(result))
    atomic_write_text(out / "probe_curve.csv", "block,probe_accuracy\n"
                      + "".join(f"{r['block']},{r['accuracy']:.6f}\n" for r in result["probe"]))
    plot_analysis(result, out / "probe")
    return result


def cmd_analyze(args: argparse.Namespace) -> int:
    from .runs import check_device_flags

    check_device_flags(args)
    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis"
    result = analyze_run(args.run_dir, out, args.device, progress=not args.quiet)
    print(format_markdown(result))
    print(f"written to {out}: analysis.md, analysis.json, probe_curve.csv, probe.png, probe.svg")
    return 0
