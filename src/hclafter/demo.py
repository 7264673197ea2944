"""``hclafter demo``: the whole method on a synthetic emotion world, with a small aligned CLIP.

Generates the demo dataset (:mod:`hclafter.world` images, seeded apart from the toy CLIP's
pre-training images), then runs zero-shot CLIP, the text-only classifier, LaFTer and
HybridCascade-LaFTer with the shipped toy CLIP, prints a comparison table and writes a report
with plots. Nothing is downloaded. The world is synthetic: its numbers show the method working
end to end, not what it achieves on real photographs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import yaml
import torch.nn.functional as F
from PIL import Image

from .backbone import backbone_from_config
from .config import Config, load_config
from .data import DatasetSplits, load_splits, make_dataset
from .data.images import load_rgb
from .evaluation import clip_classifier, evaluate_classifier
from .files import RunError
from .inference import load_run
from .plots import plt, save_figure
from .run import train_run, zeroshot_eval
from .runtime import cache_dir_of, make_runtime
from .text import load_templates, train_stage1, zeroshot_weights
from .timing import interleaved, per_image_ms

# Zero-shot accuracy of the shipped toy CLIP on the demo's test split, as
# `zeroshot_eval(demo_config(...), "test")` gives it on CPU; README's quick start shows it too.
TOY_CLIP_ZEROSHOT_ACCURACY = 0.647


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


def demo_config(out_dir: Optional[Path] = None, weights: Optional[Path] = None, device: str = "auto",
                method: str = "HybridCascade-LaFTer") -> Config:
    """The demo's config for ``method`` (LaFTer: the last block only, no stage adapters): the shipped
    ``demo.yaml`` plus the shipped toy CLIP and descriptions, and the output folders."""
    overrides = [f"device={device}", "backbone.name=toy-clip",
                 f"backbone.pretrained={weights or toy_clip_dir() / 'toy_clip.safetensors'}",
                 f"text.descriptions={demo_descriptions()}"]
    if out_dir is not None:
        overrides += [f"cache_dir={Path(out_dir) / 'cache'}", f"data.root={Path(out_dir) / 'data'}"]
    if method == "LaFTer":
        overrides += ["model.stages=[[12]]", "model.stage_adapters=false"]
    model_cfg = yaml.safe_dump(toy_clip_model_cfg(), default_flow_style=True).strip()
    return load_config([demo_config_file()], [*overrides, f"backbone.model_cfg={model_cfg}"])


# --- measuring ---------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, flush=True)


@torch.no_grad()
def per_image_latency_ms(fns: dict[str, Callable[[torch.Tensor], Any]], images: torch.Tensor, repeats: int = 15,
                         warmup: int = 3) -> dict[str, float]:
    """Per-image inference time of each function: median over ``repeats`` calls on ``images``, divided
    by the batch size. The functions take turns, so a busy machine slows them all alike."""
    times = interleaved([lambda fn=fn: fn(images) for fn in fns.values()], repeats, images.device, warmup)
    return {name: per_image_ms(t, images.shape[0]) for name, t in zip(fns, times)}


def _test_batch(data: DatasetSplits, backbone, n: int = 8) -> torch.Tensor:
    return torch.stack([backbone.preprocess(load_rgb(s.path)) for s in data["test"][:n]])


# --- report ------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict], chance: float) -> str:
    head = f"{'method':<22}{'accuracy':>9}{'macro-F1':>10}{'KL':>8}{'trained params':>16}{'ms/image':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<22}{r['accuracy']:>9.3f}{r['macro_f1']:>10.3f}{r['kl']:>8.3f}"
                     f"{r['parameters']:>16,}{r['latency_ms']:>10.2f}")
    lines.append(f"chance accuracy: {chance:.3f}")
    return "\n".join(lines)


def _markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| method | accuracy | macro-F1 | KL ↓ | trained parameters | latency (ms/image) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['kl']:.3f} | {r['parameters']:,} | "
              f"{r['latency_ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def plot_comparison(rows: Sequence[dict], chance: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(rows))
    for offset, key, label in ((-0.18, "accuracy", "accuracy"), (0.18, "macro_f1", "macro-F1")):
        bars = ax.bar(x + offset, [r[key] for r in rows], width=0.36, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    ax.set_xticks(x, [r["method"] for r in rows], fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_title("Test split of the synthetic emotion world (toy CLIP)")
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def _save_world_samples(data: DatasetSplits, path: Path) -> None:
    classes = data.wheel.classes
    by_class: dict[int, list[np.ndarray]] = {c: [] for c in range(len(classes))}
    for s in data["test"]:
        if len(by_class[s.label]) < 8:
            by_class[s.label].append(np.asarray(load_rgb(s.path)))
    tiles = [np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)), constant_values=255) for im in by_class[c]], axis=1)
             for c in range(len(classes)) if by_class[c]]
    width = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def write_demo_report(out: Path, rows: Sequence[dict], chance: float, info: dict) -> Path:
    classes = info["classes"]
    stages = info.get("hybrid_stage_accuracy") or []
    stage_text = ", ".join(f"stage {i + 1} (blocks {'/'.join(map(str, layers))}) {acc:.3f}"
                           for i, (layers, acc) in enumerate(zip(info["stages"], stages)))
    text = f"""# hclafter demo report

**The data are synthetic.** Images come from `hclafter.world`, a seeded generator in which each
Mikels-8 emotion is carried by one family of visual cues (colour, brightness, shapes, a simple
scene and a fine texture), with ambiguity between wheel neighbours; every image has its own
vote distribution. The dataset's images are taken "in the wild" (colour casts, exposure changes,
unrelated clutter). The backbone is the toy CLIP shipped with hclafter (12 image blocks, 32-pixel
images), pre-trained on clean captioned images of the same world, drawn from other seeds. The
numbers show the method working end to end; they say nothing about real photographs.

Dataset: {info['num_samples']['train']} train / {info['num_samples']['val']} val / {info['num_samples']['test']} test
images, {len(classes)} classes ({', '.join(classes)}); test metrics below, checkpoints selected on val.
Device: {info['device']}; total time {info['time_s']:.0f} s.

{_markdown_table(rows)}

Chance accuracy: {chance:.3f}. KL: mean KL(target distribution ‖ predicted distribution). Trained
parameters: zero-shot trains none; the text-only classifier is `U` (classes × embedding width),
trained on text; LaFTer and HybridCascade-LaFTer count every parameter tuned on images.
Latency: median per-image forward time over repeated batches of {info['latency_batch']} on {info['device']}.

HybridCascade-LaFTer per-stage test accuracy: {stage_text or 'n/a'}.

![accuracy per method](plots/accuracy.png)

Example test images, one emotion per row ({', '.join(classes)}):

![world samples](plots/world_samples.png)

Runs (configs, metrics per epoch, predictions, confusion matrices, curves):
[`runs/lafter`](runs/lafter/summary.json), [`runs/hybrid`](runs/hybrid/summary.json).

![HybridCascade-LaFTer confusion matrix](runs/hybrid/plots/confusion.png)

![HybridCascade-LaFTer curves](runs/hybrid/plots/curves.png)

Re-run: `hclafter demo --out {out}`; train on real data: see README ("Running on real data").
"""
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


# --- the demo ----------------------------------------------------------------------------------


def _fresh_run_dir(path: Path) -> Path:
    """The demo's own run folder, emptied of an earlier demo's run (and nothing else)."""
    if path.is_dir() and any(path.iterdir()):
        if not any((path / name).exists() for name in ("config.yaml", "summary.json", "checkpoints")):
            raise RunError(f"{path} holds files that are not a run; give hclafter demo another --out")
        _say(f"      replacing the earlier demo run in {path}")
        shutil.rmtree(path)
    return path


def _timed_step(title: str, fn: Callable[[], Any], result: Callable[[Any], str]) -> Any:
    start = time.time()
    _say(f"\n{title}")
    value = fn()
    _say(f"      {result(value)}  ({time.time() - start:.1f}s)")
    return value


def _frozen_baselines(cfg: Config, data: DatasetSplits, out: Path) -> tuple[dict, dict]:
    """Zero-shot CLIP and the stage-1 text classifier on the test split (all metrics), with the
    per-image latency of every method's classifier."""
    runtime = make_runtime(cfg)
    dev, cache = runtime.device, cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    backbone.model.to(dev).eval()
    text_weight, _ = train_stage1(backbone, data.wheel, cfg.text, cfg.seed, cache, dev)
    test = make_dataset(data["test"], data.wheel, backbone.preprocess, cfg.data)
    text_only = evaluate_classifier(clip_classifier(backbone.model, text_weight, 1.0, runtime), test, cfg.data,
                                    data.wheel, runtime, progress=False)
    zs_weight = zeroshot_weights(backbone, data.wheel, load_templates(data.wheel, cfg.text.templates), cache, dev)
    encode = backbone.model.encode_image
    fns = {"zero-shot": lambda x: F.normalize(encode(x), dim=-1) @ zs_weight.to(dev).T,
           "text-only": lambda x: F.normalize(encode(x), dim=-1) @ text_weight.to(dev).T}
    for method, name in (("LaFTer", "lafter"), ("HybridCascade-LaFTer", "hybrid")):
        model = load_run(out / "runs" / name, device=cfg.device).model.eval()
        fns[method] = lambda x, m=model: m.forward_stages(x).logits
    batch = _test_batch(data, backbone).to(dev)
    return {"text_only": text_only, "text_parameters": text_weight.numel(), "device": str(dev),
            "latency_batch": batch.shape[0]}, per_image_latency_ms(fns, batch)


def _rows(zeroshot: dict, lafter: dict, hybrid: dict, frozen: dict, latency: dict) -> list[dict]:
    def row(method: str, metrics: dict, kl: float, parameters: int) -> dict:
        return {"method": method, "accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"]),
                "kl": float(kl), "parameters": int(parameters), "latency_ms": latency[method]}

    return [row("zero-shot", zeroshot, zeroshot["ldl"]["kl"], 0),
            row("text-only", lafter["text_only"]["test"], frozen["text_only"]["ldl"]["kl"],
                frozen["text_parameters"]),
            row("LaFTer", lafter["test"], lafter["test"]["ldl"]["kl"], lafter["parameters"]["trainable"]),
            row("HybridCascade-LaFTer", hybrid["test"], hybrid["test"]["ldl"]["kl"],
                hybrid["parameters"]["trainable"])]


def run_demo(out: Path, device: str = "auto", progress: bool = True, weights: Optional[Path] = None) -> dict:
    """Everything ``hclafter demo`` does; returns the results (also written to ``out/results.json``).

    ``weights``: another toy-CLIP weights file (e.g. one written by ``scripts/train_toy_clip.py``).
    """
    started = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, weights=weights, device=device)
    lafter_cfg = demo_config(out, weights=weights, device=device, method="LaFTer")
    _say("hclafter demo: zero-shot, text-only, LaFTer and HybridCascade-LaFTer with a small CLIP on a SYNTHETIC "
         "emotion world\n(shipped weights, no download; the numbers show the method working, not real-photo results)")
    synthetic = cfg.data.synthetic
    reused = (Path(cfg.data.root) / "manifest.csv").is_file()
    data = _timed_step(f"[1/5] emotion dataset: {synthetic.per_class} images per class, seed {synthetic.seed}, "
                       f"{'already generated in' if reused else 'generating into'} {cfg.data.root}",
                       lambda: load_splits(cfg.data, cfg.seed, cache_dir_of(cfg)),
                       lambda d: " / ".join(f"{len(d[s])} {s}" for s in ("train", "val", "test")) + " images")
    zeroshot = _timed_step("[2/5] zero-shot CLIP (class-name templates) on test",
                           lambda: zeroshot_eval(cfg, "test", progress=progress),
                           lambda m: f"accuracy {m['accuracy']:.3f}")
    lafter = _timed_step("[3/5] LaFTer: text-only classifier, then visual prompts on the last block",
                         lambda: train_run(lafter_cfg, _fresh_run_dir(out / "runs" / "lafter"), progress=progress),
                         lambda r: f"text-only accuracy {r['text_only']['test']['accuracy']:.3f}, "
                                   f"LaFTer accuracy {r['test']['accuracy']:.3f}")
    hybrid = _timed_step("[4/5] HybridCascade-LaFTer: stages " + " | ".join(",".join(map(str, s))
                                                                          for s in cfg.model.stages),
                         lambda: train_run(cfg, _fresh_run_dir(out / "runs" / "hybrid"), progress=progress),
                         lambda r: f"accuracy {r['test']['accuracy']:.3f}")
    frozen, latency = _timed_step("[5/5] text-only distributions and per-image latency",
                                  lambda: _frozen_baselines(cfg, data, out), lambda _: "done")
    rows = _rows(zeroshot, lafter, hybrid, frozen, latency)
    chance = 1.0 / data.wheel.num_classes
    info = {"classes": list(data.wheel.classes), "num_samples": {s: len(data[s]) for s in ("train", "val", "test")},
            "device": frozen["device"], "latency_batch": frozen["latency_batch"], "stages": cfg.model.stages,
            "hybrid_stage_accuracy": hybrid["test"].get("stage_accuracy")}
    plot_comparison(rows, chance, out / "plots" / "accuracy.png")
    _save_world_samples(data, out / "plots" / "world_samples.png")
    info["time_s"] = time.time() - started
    report = write_demo_report(out, rows, chance, info)
    results = {"rows": rows, "chance": chance, **info}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    _say("\n" + format_table(rows, chance))
    _say(f"\nreport: {report}   ({info['time_s']:.0f}s in all)")
    return results


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), device=args.device, progress=not args.quiet)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hclafter demo`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser("demo", help="the whole method on a synthetic emotion world with the shipped toy CLIP "
                                           "(no download, a few minutes on a CPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m hclafter.demo [--out DIR]``, the same as ``hclafter demo``."""
    parser = argparse.ArgumentParser(prog="python -m hclafter.demo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
