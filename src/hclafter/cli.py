"""The ``hclafter`` command: a thin layer over the library functions."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import demo, describe
from .config import ConfigError, load_config


def _metrics_table(metrics: dict) -> str:
    rows = [("accuracy", metrics["accuracy"]), ("macro_f1", metrics["macro_f1"]),
            ("polarity_accuracy", metrics["polarity_accuracy"])]
    rows += [(f"stage{s + 1}_accuracy", a) for s, a in enumerate(metrics.get("stage_accuracy") or [])]
    rows += [(f"ldl_{k}", v) for k, v in metrics["ldl"].items()]
    return "\n".join(f"{name:<22}{value:.4f}" for name, value in rows)


def cmd_train(args: argparse.Namespace) -> int:
    from .run import train_run

    cfg = load_config(args.config, args.overrides)
    summary = train_run(cfg, Path(args.out), progress=not args.quiet, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun the first process reports
    selected = f" (best epoch {summary['best_epoch']} on val)" if "best_epoch" in summary else ""
    print(f"run written to {args.out}{selected}")
    print(_metrics_table(summary["test"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .inference import load_run

    metrics = load_run(args.run_dir, args.device, args.precision).evaluate(args.split, progress=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else _metrics_table(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import load_run

    result = load_run(args.run_dir, args.device, args.precision).predict(args.images)
    items = [{"image": str(path), "label": label,
              "distribution": {c: round(float(p), 6) for c, p in zip(result.classes, dist)}}
             for path, label, dist in zip(args.images, result.labels, result.distributions)]
    if args.json:
        print(json.dumps(items if len(items) > 1 else items[0], indent=2))
    else:
        for item in items:
            top = sorted(item["distribution"].items(), key=lambda kv: -kv[1])[:3]
            print(f"{item['image']}: {item['label']}  (" + ", ".join(f"{c} {p:.3f}" for c, p in top) + ")")
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from .run import zeroshot_eval

    cfg = load_config(args.config, args.overrides)
    metrics = zeroshot_eval(cfg, args.split, progress=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else _metrics_table(metrics))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import SPLITS, check_dataset, describe_problems
    from .runtime import cache_dir_of

    overrides = [f"data.format={args.format}", f"data.root={args.root}", *args.overrides]
    if args.skip_invalid:
        overrides.append("data.skip_invalid=true")
    cfg = load_config(args.config, overrides)
    data, problems, dropped = check_dataset(cfg.data, cfg.seed, cache_dir_of(cfg))
    print(f"dataset: {args.root} (format {args.format})")
    if data is not None:
        width = max(len(c) for c in data.wheel.classes)
        print(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
        for label, name in enumerate(data.wheel.classes):
            counts = [sum(s.label == label for s in data[split]) for split in SPLITS]
            print(f"{name:<{width}}  " + "  ".join(f"{n:>6}" for n in counts))
        print(f"{'total':<{width}}  " + "  ".join(f"{len(data[s]):>6}" for s in SPLITS))
    if dropped:
        print(f"\n{len(dropped)} image(s) left out by the dataset's protocol:\n" + describe_problems(dropped, args.limit))
    if problems:
        print(f"\n{describe_problems(problems, args.limit)}")
    empty = [] if data is None else [s for s in SPLITS if not data[s]]
    fails = data is None or bool(empty) or (bool(problems) and not cfg.data.skip_invalid)
    if empty:
        print(f"\nempty split(s): {empty}")
    if fails:
        print("\ntraining would fail: fix the problems above" +
              ("" if not problems or cfg.data.skip_invalid else ", or skip them with data.skip_invalid=true"))
        return 1
    print("\nok: training can start" + (f" ({len(problems)} bad input(s) will be skipped)" if problems else ""))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.store import prepare_stores

    for line in prepare_stores(load_config(args.config, args.overrides), progress=not args.quiet):
        print(line)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    if args.launcher or args.collect or args.wait:
        from .launchers import cluster_sweep

        return cluster_sweep(Path(args.sweep), Path(args.out), args.overrides, launcher=args.launcher, wait=args.wait)
    run_sweep(Path(args.sweep), Path(args.out), args.overrides, progress=not args.quiet)
    print(f"results: {Path(args.out) / 'results.md'} and results.csv; plots in {Path(args.out) / 'plots'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"report written to {write_report(Path(args.run_dir))}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import compile_rates, epoch_rates, onnx_latency, run_bench

    if args.onnx:
        result = onnx_latency(args.batch, args.prompts, args.repeats)
    elif args.epoch:
        result = epoch_rates(args.device, args.precision, args.batch, args.epoch, prompts=args.prompts)
    elif args.compile:
        result = compile_rates(args.compile, args.device, args.batch, args.prompts, args.repeats,
                               precision=args.precision)
    else:
        result = run_bench(args.device, args.batch, args.prompts, args.repeats, precision=args.precision)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:<30}{value:.4f}" if isinstance(value, float) else f"{key:<30}{value}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_hf, export_onnx

    if args.format == "hf":
        out = export_hf(args.run_dir, args.out, include_backbone=args.include_backbone)
        print(f"Hugging Face model directory written to {out} (config.json, model.safetensors, README.md); it "
              f"predicts as the run does. Load it with hclafter.from_pretrained({str(out)!r}), push it with "
              f".push_to_hub('user/name')")
        return 0
    if args.include_backbone:
        print("error: --include-backbone applies to --format hf; an ONNX graph always contains the backbone",
              file=sys.stderr)
        return 2
    result = export_onnx(args.run_dir, args.out)
    print(f"ONNX model written to {result['path']} (opset {result['opset']}, dynamic batch); ONNX Runtime matches "
          f"PyTorch within {result['max_abs_diff']:.1e} on {result['images_checked']} test images")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.run_dir, args.host, args.port, args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hclafter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                       help="config file; repeat to merge several (later ones win)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    p = sub.add_parser("train", help="stage 1 + stage 2 training into a run directory")
    with_config(p)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last saved state (its own config)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a finished run on one of its saved splits")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="default: the run's own")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top emotion and predicted distribution for image files")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="default: the run's own")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("zeroshot", help="zero-shot CLIP baseline with the label space's templates")
    with_config(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("sweep", help="run a grid of methods x datasets x overrides x seeds; mean ± std tables")
    p.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("--out", required=True, help="sweep directory (re-running it finishes missing runs only)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--launcher", choices=("slurm",), default=None,
                   help="submit the unfinished runs as a SLURM job array (settings under the sweep file's "
                        "'slurm:' key; needs hclafter[slurm]) instead of running them here")
    p.add_argument("--wait", action="store_true", help="with --launcher: wait for the jobs, then write the tables")
    p.add_argument("--collect", action="store_true",
                   help="write the tables of a submitted sweep once every run has finished (lists those that have not)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="a self-contained HTML report of one finished run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="speed/memory/FLOP ratios: HybridCascade vs LaFTer vs Cascade-CLIP (ViT-B-32)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds for the eval timing (half for the slower measurements); minima are compared")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="the model timings' precision (bf16: autocast over the tower's frozen weights in bf16)")
    p.add_argument("--compile", metavar="BACKEND",
                   help="instead: both models' eval and training step under torch.compile (e.g. inductor)")
    p.add_argument("--epoch", type=int, metavar="IMAGES",
                   help="instead: end-to-end training images/s over IMAGES synthetic 640x480 JPEGs, decoded in "
                        "every epoch vs read from the image store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--onnx", action="store_true",
                   help="instead: ONNX Runtime vs PyTorch latency per image of HybridCascade-LaFTer on CPU "
                        "(needs hclafter[onnx])")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="a run as a Hugging Face model directory or an ONNX graph")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=("hf", "onnx"),
                   help="hf: config.json + model.safetensors + README.md model card; onnx: images -> fused "
                        "probabilities and per-stage logits (needs hclafter[onnx])")
    p.add_argument("out", help="output directory (hf) or .onnx file")
    p.add_argument("--include-backbone", action="store_true",
                   help="hf: embed the CLIP image tower instead of referencing its weights file by name and hash")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a local web demo of a run (needs hclafter[serve])")
    p.add_argument("run_dir")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_serve)

    describe.add_parser(sub)
    demo.add_parser(sub)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="validate a dataset root without training: counts per class and split, "
                                          "missing/unreadable files, unknown classes, malformed lines")
    p.add_argument("--format", required=True, help="dataset format (emotion6, emoset, fi, manifest, ...)")
    p.add_argument("root", help="dataset root (or manifest file)")
    with_config(p)
    p.add_argument("--skip-invalid", action="store_true", help="judge as a run with data.skip_invalid=true would")
    p.add_argument("--limit", type=int, default=50, help="problems listed in full (default 50)")
    p.set_defaults(func=cmd_data_check)
    p = data_sub.add_parser("prepare", help="decode a run config's images once into the pre-decoded image store "
                                            "(training does it on first use unless data.image_store=off)")
    with_config(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides may stand anywhere on the line (also after --out), which plain argparse rejects.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from .backbone import BackboneError
    from .data import DataError
    from .files import RunError
    from .runtime import DeviceError
    from .text import TextCorpusError
    from .training import TrainingInterrupted

    try:
        return args.func(args)
    except (ConfigError, DataError, BackboneError, RunError, DeviceError, TextCorpusError, describe.DescribeError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
