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
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, config_from_dict

# Zero-shot accuracy of the shipped toy CLIP on the demo's test split (data seed DATA_SEED),
# as `zeroshot_eval(demo_config(...), "test")` gives it on CPU; README's quick start shows it too.
TOY_CLIP_ZEROSHOT_ACCURACY = 0.647
DATA_SEED = 2024  # the demo images; the toy CLIP was pre-trained on other seed streams
PER_CLASS = 150
SPLIT_RATIOS = [0.6, 0.1, 0.3]


def toy_clip_dir() -> Path:
    return Path(str(resources.files("hclafter").joinpath("resources", "toy_clip")))


def toy_clip_model_cfg() -> dict[str, Any]:
    return json.loads((toy_clip_dir() / "config.json").read_text(encoding="utf-8"))


def demo_descriptions() -> Path:
    return Path(str(resources.files("hclafter").joinpath("resources", "descriptions", "demo_world.json")))


def demo_settings(out_dir: Optional[Path] = None, weights: Optional[Path] = None, device: str = "auto") -> dict:
    """The demo's HybridCascade-LaFTer config as a dict (``configs/demo.yaml`` spells out the same)."""
    out = Path(out_dir) if out_dir is not None else None
    return {
        "seed": 0,
        "device": device,
        "cache_dir": str(out / "cache") if out is not None else None,
        "backbone": {"name": "toy-clip", "model_cfg": toy_clip_model_cfg(),
                     "pretrained": str(weights or toy_clip_dir() / "toy_clip.safetensors")},
        "model": {"prompt_tokens": 8},
        "data": {"format": "synthetic", "root": str(out / "data") if out is not None else None,
                 "synthetic": {"per_class": PER_CLASS, "image_size": 32, "seed": DATA_SEED},
                 "split_ratios": SPLIT_RATIOS, "distribution": {"source": "dataset"},
                 "batch_size": 32, "eval_batch_size": 128},
        "text": {"descriptions": str(demo_descriptions()), "steps": 300, "lr": 1e-2},
        "train": {
            "lr": {"prompts": 1e-2, "layernorms": 3e-3, "classifier": 3e-3, "stage_adapters": 3e-3, "fusion": 3e-2,
                   "nga": 1e-2, "projections": 1e-3, "decoders": 1e-3, "backbone": 1e-4},
            "warmup_epochs": 0.5,
            "phases": [{"epochs": 1, "train": ["stage_adapters", "fusion"]},
                       {"epochs": 4, "train": ["stage_adapters", "fusion", "nga", "prompts", "layernorms", "classifier"]},
                       {"epochs": 2, "train": ["stage_adapters", "fusion", "nga", "prompts", "layernorms", "classifier"],
                        "consistency": True}],
        },
    }


def demo_config(out_dir: Optional[Path] = None, weights: Optional[Path] = None, device: str = "auto",
                method: str = "HybridCascade-LaFTer") -> Config:
    """The demo's config for ``method`` (LaFTer: the last block only, no stage adapters)."""
    settings = demo_settings(out_dir, weights, device)
    if method == "LaFTer":
        settings["model"].update({"stages": [[12]], "stage_adapters": False})
    return config_from_dict(settings)


# --- measuring ---------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, flush=True)


@torch.no_grad()
def per_image_latency_ms(fns: dict[str, Callable[[torch.Tensor], Any]], images: torch.Tensor, repeats: int = 15,
                         warmup: int = 3) -> dict[str, float]:
    """Per-image inference time of each function: median over ``repeats`` calls on ``images``, divided
    by the batch size. The functions take turns, so a busy machine slows them all alike."""
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn(images)
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(t) / images.shape[0] for name, t in times.items()}


def _text_only_metrics(cfg: Config, data, backbone, device: torch.device) -> tuple[dict, torch.Tensor]:
    """The stage-1 classifier alone on the test split (as a run's ``text_only`` entry), with all metrics."""
    from .data import make_dataset, make_loader
    from .evaluation import compute_metrics, predict
    from .run import cache_dir_of
    from .text import class_texts, encode_texts, load_descriptions, load_templates, train_text_classifier

    wheel = data.wheel
    texts, labels = class_texts(wheel, load_descriptions(wheel, cfg.text.descriptions),
                                load_templates(wheel, cfg.text.templates), backbone.tokenizer)
    features = encode_texts(backbone, texts, cache_dir_of(cfg), cfg.text.batch_size, device)
    weight, _ = train_text_classifier(features, torch.tensor(labels), wheel.num_classes, cfg.text, cfg.seed)
    weight = weight.to(device)
    model = backbone.model.to(device)

    def classify(images: torch.Tensor):
        return F.normalize(model.encode_image(images.to(device)).float(), dim=-1) @ weight.T, None

    loader = make_loader(make_dataset(data["test"], wheel, backbone.preprocess, cfg.data), cfg.data.eval_batch_size,
                         False, cfg.seed, 0)
    return compute_metrics(predict(classify, loader, None, progress=False), wheel), weight


def _test_batch(data, backbone, n: int = 8) -> torch.Tensor:
    from .images import load_rgb

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
    from .plots import _save, plt

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
    _save(fig, path)


def _save_world_samples(data, path: Path) -> None:
    from PIL import Image

    from .images import load_rgb

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


def write_report(out: Path, rows: Sequence[dict], chance: float, info: dict) -> Path:
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
    from .run import RunError

    if path.is_dir() and any(path.iterdir()):
        if not any((path / name).exists() for name in ("config.yaml", "summary.json", "checkpoints")):
            raise RunError(f"{path} holds files that are not a run; give hclafter demo another --out")
        _say(f"      replacing the earlier demo run in {path}")
        shutil.rmtree(path)
    return path


def run_demo(out: Path, device: str = "auto", progress: bool = True, weights: Optional[Path] = None) -> dict:
    """Everything ``hclafter demo`` does; returns the results (also written to ``out/results.json``).

    ``weights``: another toy-CLIP weights file (e.g. one written by ``scripts/train_toy_clip.py``).
    """
    from .backbone import backbone_from_config
    from .baselines import zeroshot_eval
    from .data import load_splits
    from .run import cache_dir_of, load_run, make_accelerator, train_run

    started = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, weights=weights, device=device)
    lafter_cfg = demo_config(out, weights=weights, device=device, method="LaFTer")
    _say("hclafter demo: zero-shot, text-only, LaFTer and HybridCascade-LaFTer with a small CLIP on a SYNTHETIC "
         "emotion world\n(shipped weights, no download; the numbers show the method working, not real-photo results)")

    step = time.time()
    reused = (Path(cfg.data.root) / "manifest.csv").is_file()
    _say(f"\n[1/5] emotion dataset: {PER_CLASS} images per class, seed {DATA_SEED}, "
         f"{'already generated in' if reused else 'generating into'} {cfg.data.root}")
    data = load_splits(cfg.data, cfg.seed, cache_dir_of(cfg))
    counts = {s: len(data[s]) for s in ("train", "val", "test")}
    _say(f"      {counts['train']} train / {counts['val']} val / {counts['test']} test images ({time.time() - step:.1f}s)")

    step = time.time()
    _say("\n[2/5] zero-shot CLIP (class-name templates) on test")
    zeroshot = zeroshot_eval(cfg, "test", progress=progress)
    _say(f"      accuracy {zeroshot['accuracy']:.3f}  ({time.time() - step:.1f}s)")

    step = time.time()
    _say("\n[3/5] LaFTer: text-only classifier, then visual prompts on the last block")
    lafter = train_run(lafter_cfg, _fresh_run_dir(out / "runs" / "lafter"), progress=progress)
    _say(f"      text-only accuracy {lafter['text_only']['test']['accuracy']:.3f}, "
         f"LaFTer accuracy {lafter['test']['accuracy']:.3f}  ({time.time() - step:.1f}s)")

    step = time.time()
    _say("\n[4/5] HybridCascade-LaFTer: stages " + " | ".join(",".join(map(str, s)) for s in cfg.model.stages))
    hybrid = train_run(cfg, _fresh_run_dir(out / "runs" / "hybrid"), progress=progress)
    _say(f"      accuracy {hybrid['test']['accuracy']:.3f}  ({time.time() - step:.1f}s)")

    step = time.time()
    _say("\n[5/5] text-only distributions and per-image latency")
    accelerator = make_accelerator(cfg)
    dev = accelerator.device
    backbone = backbone_from_config(cfg.backbone)
    backbone.model.to(dev).eval()
    text_only, text_weight = _text_only_metrics(cfg, data, backbone, dev)
    if abs(text_only["accuracy"] - lafter["text_only"]["test"]["accuracy"]) > 1e-6:
        _say(f"      note: text-only re-evaluated at {text_only['accuracy']:.4f}, the run reported "
             f"{lafter['text_only']['test']['accuracy']:.4f}")
    from .text import load_templates, zeroshot_weights

    zs_weight = zeroshot_weights(backbone, data.wheel, load_templates(data.wheel, cfg.text.templates),
                                 cache_dir_of(cfg), dev).to(dev)
    batch = _test_batch(data, backbone).to(dev)
    encode = backbone.model.encode_image
    fns = {"zero-shot": lambda x: F.normalize(encode(x), dim=-1) @ zs_weight.T,
           "text-only": lambda x: F.normalize(encode(x), dim=-1) @ text_weight.T}
    for method, name in (("LaFTer", "lafter"), ("HybridCascade-LaFTer", "hybrid")):
        model = load_run(out / "runs" / name, device=cfg.device).model.eval()
        fns[method] = lambda x, m=model: m.forward_stages(x).logits
    latency = per_image_latency_ms(fns, batch)
    _say(f"      ({time.time() - step:.1f}s)")

    def row(method: str, accuracy: float, macro_f1: float, kl: float, parameters: int) -> dict:
        return {"method": method, "accuracy": float(accuracy), "macro_f1": float(macro_f1), "kl": float(kl),
                "parameters": int(parameters), "latency_ms": latency[method]}

    rows = [
        row("zero-shot", zeroshot["accuracy"], zeroshot["macro_f1"], zeroshot["ldl"]["kl"], 0),
        row("text-only", lafter["text_only"]["test"]["accuracy"], lafter["text_only"]["test"]["macro_f1"],
            text_only["ldl"]["kl"], text_weight.numel()),
        row("LaFTer", lafter["test"]["accuracy"], lafter["test"]["macro_f1"], lafter["test"]["ldl"]["kl"],
            lafter["parameters"]["trainable"]),
        row("HybridCascade-LaFTer", hybrid["test"]["accuracy"], hybrid["test"]["macro_f1"],
            hybrid["test"]["ldl"]["kl"], hybrid["parameters"]["trainable"]),
    ]
    chance = 1.0 / data.wheel.num_classes
    info = {"classes": list(data.wheel.classes), "num_samples": counts, "device": str(dev),
            "latency_batch": batch.shape[0], "stages": cfg.model.stages,
            "hybrid_stage_accuracy": hybrid["test"].get("stage_accuracy"), "time_s": time.time() - started}
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plot_comparison(rows, chance, out / "plots" / "accuracy.png")
    _save_world_samples(data, out / "plots" / "world_samples.png")
    info["time_s"] = time.time() - started
    report = write_report(out, rows, chance, info)
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
