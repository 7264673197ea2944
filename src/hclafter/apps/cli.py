"""The ``hclafter`` command: a thin layer over the library functions."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.config import Config, ConfigError, load_config, to_dict
from ..version import __version__
from . import demo, describe

DESCRIPTION = """\
hclafter: visual emotion recognition with CLIP. Trains and evaluates HybridCascade-LaFTer (a text-trained
classifier applied to CLIP features read after several image blocks, aggregated per stage and fused),
its baselines and ablations, and applies trained runs to new images. Every command has --help."""

EXAMPLES = """\
examples:
  hclafter demo --out runs/demo                      # the whole method on a synthetic world, nothing downloaded
  hclafter eval runs/demo/runs/hybrid                # re-evaluate a run on its test split
  hclafter predict runs/demo/runs/hybrid photos/ --format jsonl > predictions.jsonl
  hclafter report runs/demo/runs/hybrid              # HTML report: runs/demo/runs/hybrid/report.html
  hclafter train -c configs/base/vitb32.yaml -c configs/methods/hybrid.yaml -c configs/datasets/fi.yaml \\
      --out runs/fi-hybrid backbone.pretrained=/data/clip/ViT-B-32.pt data.root=/data/FI
  hclafter sweep configs/sweeps/smoke.yaml --out runs/smoke
  hclafter data check --format fi /data/FI"""

# Options that mean the same in every command, explained once: an option of a command registered
# elsewhere (demo, describe) without its own help gets this one.
COMMON_HELP = {
    "--device": "where to compute: auto (a GPU if there is one), cpu or cuda",
    "--precision": "numeric precision of the forward pass (bf16/fp16: autocast); default: the run's own",
    "--quiet": "no progress bars (the per-epoch summaries stay)",
    "--json": "print JSON instead of a table",
    "run_dir": "a finished run directory (e.g. runs/demo/runs/hybrid)",
}


def _metrics_table(metrics: dict) -> str:
    rows = [("accuracy", metrics["accuracy"]), ("macro_f1", metrics["macro_f1"]),
            ("polarity_accuracy", metrics["polarity_accuracy"])]
    rows += [(f"stage{s + 1}_accuracy", a) for s, a in enumerate(metrics.get("stage_accuracy") or [])]
    rows += [(f"ldl_{k}", v) for k, v in metrics["ldl"].items()]
    return "\n".join(f"{name:<22}{value:.4f}" for name, value in rows)


def inapplicable_options(cfg: Config) -> list[str]:
    """Settings that differ from the defaults in sections a frozen baseline never reads (zero-shot
    CLIP: the model, training and stage-1 settings except the templates; text-only: the model and
    training settings), so the user learns they were ignored."""
    if cfg.mode == "train":
        return []
    ignored = ("model.", "train.") + (("text.",) if cfg.mode == "zeroshot" else ())
    kept = ("text.templates", "text.batch_size")

    def flat(node: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    given, default = flat(to_dict(cfg)), flat(to_dict(Config()))
    return [k for k, v in given.items() if k.startswith(ignored) and not k.startswith(kept) and v != default.get(k)]


def _warn_inapplicable(cfg: Config) -> None:
    ignored = inapplicable_options(cfg)
    if ignored:
        what = "CLIP zero-shot" if cfg.mode == "zeroshot" else "the text-only classifier"
        print(f"warning: mode={cfg.mode} evaluates {what} without image training; these settings do not apply and "
              f"are ignored: {', '.join(ignored)}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine.run import train_run

    out = Path(args.out)
    # Resuming, overrides apply to the run's own config (so only what they change differs from it).
    base = [out / "config.yaml"] if args.resume and not args.config and (out / "config.yaml").is_file() else []
    cfg = load_config(args.config or base, args.overrides)
    _warn_inapplicable(cfg)
    summary = train_run(cfg, out, progress=not args.quiet, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun the first process reports
    selected = f" (best epoch {summary['best_epoch']} on val)" if "best_epoch" in summary else ""
    print(f"run written to {args.out}{selected}")
    print(_metrics_table(summary["test"]))
    return 0


def _check_device_flags(args: argparse.Namespace) -> None:
    """Refuse --device/--precision values this machine cannot honour, naming the flag."""
    import torch

    from ..core.runtime import DeviceError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if getattr(args, "precision", None) == "fp16" and (args.device == "cpu" or not torch.cuda.is_available()):
        raise DeviceError("--precision fp16 needs a CUDA device (CPUs have no fp16 autocast); use --precision bf16 "
                          "or fp32")


def _load_run(args: argparse.Namespace):
    """The run of ``args.run_dir``, with errors about devices naming this command's flags."""
    from ..engine.inference import load_run
    from ..core.runtime import DeviceError

    _check_device_flags(args)
    try:
        return load_run(args.run_dir, args.device, getattr(args, "precision", None))
    except DeviceError as e:
        raise DeviceError(f"{e} (the run's own setting; on the command line use --device / --precision)") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from ..core.files import read_json

    run = _load_run(args)
    if args.data is not None or args.overrides:
        from .crossdata import cross_dataset_config, describe_result, evaluate_on

        cfg = cross_dataset_config(args.run_dir, args.data, args.overrides)
        result = evaluate_on(run, cfg.data, args.split, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else
              describe_result(result) + "\n\n" + _metrics_table(result["metrics"]))
        return 0
    metrics = run.evaluate(args.split, progress=not args.json)
    summary = run.run_dir / "summary.json"
    best = read_json(summary).get("best_epoch") if summary.is_file() else None
    checkpoint = f"checkpoint of epoch {best} (selected on val)" if best else "the run's model"
    header = f"{run.run_dir}: {args.split} split, {metrics['num_samples']} images, {checkpoint}"
    if args.json:
        print(header, file=sys.stderr)
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{header}\n{_metrics_table(metrics)}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_run, format_markdown

    _check_device_flags(args)
    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis"
    result = analyze_run(args.run_dir, out, args.device, progress=not args.quiet)
    print(format_markdown(result))
    print(f"written to {out}: analysis.md, analysis.json, probe_curve.csv, probe.png, probe.svg")
    return 0


class PredictionWriter:
    """Predictions as they stream in, in one of the formats: ``table`` for reading, ``csv`` and
    ``jsonl`` (always one object per image) for scripts. Unreadable images are reported on stderr
    as they come, and in the csv/jsonl output with an ``error``."""

    def __init__(self, fmt: str, classes: Sequence[str], top_k: int, stage_blocks: Optional[list[list[int]]]) -> None:
        from ..reporting.plots import stage_label

        self.fmt, self.classes, self.top_k = fmt, list(classes), top_k
        self.stage_names = [stage_label(s + 1, b) for s, b in enumerate(stage_blocks)] if stage_blocks else []
        self.stage_blocks = stage_blocks or []
        self.csv = csv.writer(sys.stdout, lineterminator="\n") if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["path", "label", *[f"p_{c}" for c in classes],
                               *[f"s{k}_{c}" for k in range(1, len(self.stage_blocks) + 1) for c in classes], "error"])

    def _named(self, distribution) -> dict[str, float]:
        return {c: round(float(p), 6) for c, p in zip(self.classes, distribution)}

    def _top(self, distribution) -> list[tuple[str, float]]:
        order = sorted(range(len(self.classes)), key=lambda i: -distribution[i])[:self.top_k]
        return [(self.classes[i], float(distribution[i])) for i in order]

    def write(self, result) -> None:
        if result.error is not None:
            print(f"error: {result.error}", file=sys.stderr)
        if self.fmt == "jsonl":
            item = {"image": result.source}
            if result.error is not None:
                item["error"] = result.error
            else:
                item.update(label=result.label,
                            top=[{"label": c, "p": round(p, 6)} for c, p in self._top(result.distribution)],
                            distribution=self._named(result.distribution))
                if result.stage_distributions is not None:
                    item["stages"] = [{"stage": s + 1, "blocks": blocks, "label": self.classes[int(d.argmax())],
                                       "distribution": self._named(d)}
                                      for s, (blocks, d) in enumerate(zip(self.stage_blocks,
                                                                          result.stage_distributions))]
            print(json.dumps(item), flush=True)
        elif self.csv is not None:
            if result.error is not None:
                self.csv.writerow([result.source, "", *[""] * len(self.classes) * (1 + len(self.stage_blocks)),
                                   result.error])
            else:
                stages = [] if result.stage_distributions is None else result.stage_distributions.ravel()
                self.csv.writerow([result.source, result.label, *[f"{p:.6f}" for p in result.distribution],
                                   *[f"{p:.6f}" for p in stages], ""])
            sys.stdout.flush()
        elif result.error is None:
            top = ", ".join(f"{c} {p:.3f}" for c, p in self._top(result.distribution))
            print(f"{result.source}: {result.label}  ({top})", flush=True)
            for name, d in zip(self.stage_names, result.stage_distributions if result.stage_distributions is not None
                               else []):
                print(f"    {name}: {self.classes[int(d.argmax())]} {float(d.max()):.3f}")


def cmd_predict(args: argparse.Namespace) -> int:
    from ..engine.inference import image_sources
    from ..core.progress import bar

    fmt = "jsonl" if args.json else args.format
    if not args.images and args.from_list is None:
        print("error: give image files, folders or patterns, or --from LIST", file=sys.stderr)
        return 2
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            print(f"error: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    run = _load_run(args)
    sources = image_sources(args.images, args.from_list)
    writer = PredictionWriter(fmt, run.wheel.classes, args.top_k, run.stage_blocks if args.stages else None)
    bad = 0
    # a bar on the terminal while the results go to a file or pipe; on a terminal the lines show progress
    for result in bar(run.predict_stream(sources, args.batch_size, stages=args.stages), "predict",
                      enabled=not sys.stdout.isatty(), total=len(sources)):
        writer.write(result)
        bad += result.error is not None
    if bad:
        print(f"error: {bad} of {len(sources)} input(s) could not be read (listed above); the others were predicted",
              file=sys.stderr)
        return 1
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from ..engine.run import zeroshot_eval

    cfg = load_config(args.config, args.overrides)
    _warn_inapplicable(dataclasses.replace(cfg, mode="zeroshot"))
    metrics = zeroshot_eval(cfg, args.split, progress=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else _metrics_table(metrics))
    return 0

def cmd_data_check(args: argparse.Namespace) -> int:
    from ..data import SPLITS, check_dataset, describe_problems
    from ..core.runtime import cache_dir_of

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
    absent = {} if data is None else data.absent_classes()
    if absent:
        print("\nclasses without images (left out of that split's macro-F1):\n" +
              "\n".join(f"  {split}: {', '.join(classes)}" for split, classes in absent.items()))
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
    from ..data.store import prepare_stores

    for line in prepare_stores(load_config(args.config, args.overrides), progress=not args.quiet):
        print(line)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    if args.launcher or args.collect or args.wait:
        from .launchers import cluster_sweep

        return cluster_sweep(Path(args.sweep), Path(args.out), args.overrides, launcher=args.launcher, wait=args.wait,
                             rerun_changed=args.rerun_changed)
    run_sweep(Path(args.sweep), Path(args.out), args.overrides, progress=not args.quiet,
              rerun_changed=args.rerun_changed)
    print(f"results: {Path(args.out) / 'results.md'} and results.csv; plots in {Path(args.out) / 'plots'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..reporting.report import write_report

    folder = Path(args.run_dir)
    if (folder / "sweep.json").is_file():  # a sweep: its tables, figures and report, from the finished runs
        from .sweep import SweepRun, summarise, write_results

        entries = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
        runs = [SweepRun(e["dataset"], e["method"], e["variant"], e["seed"], [], [], Path(e["out"])) for e in entries]
        done = [r for r in runs if (r.out / "summary.json").is_file()]
        write_results(summarise(done), done, folder)
        print(f"sweep report written to {folder / 'report.html'} ({len(done)} of {len(runs)} runs finished)")
        return 0
    print(f"report written to {write_report(folder)}")
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
        width = max(map(len, result), default=0) + 2  # a key never runs into its value
        for key, value in result.items():
            print(f"{key:<{width}}{value:.4f}" if isinstance(value, float) else f"{key:<{width}}{value}")
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

    _check_device_flags(args)
    serve(args.run_dir, args.host, args.port, args.device)
    return 0


class Parser(argparse.ArgumentParser):
    """An argument parser whose options without help (e.g. of a command registered in another
    module) get the shared explanation of ``COMMON_HELP``; sub-command parsers are of this class too."""

    def add_argument(self, *names: str, **kwargs):
        if kwargs.get("help") is None and names:
            kwargs["help"] = COMMON_HELP.get(names[0])
        return super().add_argument(*names, **kwargs)


# What a command's registration function receives: the parser's sub-command action.
Subparsers = Any


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="config file; repeat to merge several (later ones win)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, anywhere on the line (e.g. train.phases.0.epochs=1 seed=1)")


def _device_options(p: argparse.ArgumentParser, precision: bool = True) -> None:
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="where to compute (default: the run's own setting; auto takes a GPU if there is one)")
    if precision:
        p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                       help="forward pass precision (bf16/fp16: autocast; fp16 needs CUDA); default: the run's own")


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="stage 1 + stage 2 training into a run directory",
                       description="Train a run (or evaluate a mode=zeroshot|textonly baseline) into --out: config, "
                                   "splits, metrics.jsonl, summary.json, weights, predictions, figures and TensorBoard "
                                   "logs (train.log_with). Progress bars on a terminal; one line per epoch and per "
                                   "evaluation when the output goes to a file.")
    _with_config(p)
    p.add_argument("--out", required=True,
                   help="run directory to write (a new one, or an interrupted one with --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or evaluation lines; the per-epoch "
                                                        "summaries stay")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last saved state (its own config)")
    p.set_defaults(func=cmd_train)


def _add_eval(sub: Subparsers) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run on one of its saved splits")
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which saved split (default test)")
    _device_options(p)
    p.add_argument("--json", action="store_true", help="print all metrics as JSON (the header goes to stderr)")
    p.add_argument("--data", default=None, metavar="FORMAT:ROOT",
                   help="evaluate on another dataset instead (e.g. fi:/data/FI, synthetic:), split as training "
                        "would; classes are mapped by name, else by polarity")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="data settings of the other dataset (e.g. data.synthetic.world=blur)")
    p.set_defaults(func=cmd_eval)


def _add_analyze(sub: Subparsers) -> None:
    p = sub.add_parser("analyze", help="what each layer and stage knows: linear probes per block of the frozen "
                                       "tower beside the trained stages, per-stage per-class accuracy, stage "
                                       "disagreements (Markdown, JSON, PNG/SVG plot)")
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    _device_options(p, precision=False)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_analyze)


def _add_predict(sub: Subparsers) -> None:
    p = sub.add_parser("predict", help="emotion predictions for image files, folders, glob patterns or a list",
                       description="Predict the emotion and its distribution for images, streamed in batches (memory "
                                   "holds one batch). An image that cannot be read is reported and the others are "
                                   "still predicted; the exit status is then 1.",
                       epilog="examples:\n  hclafter predict runs/x photo.jpg\n"
                              "  hclafter predict runs/x photos/ 'more/**/*.png' --format csv > predictions.csv\n"
                              "  find /data -name '*.jpg' | hclafter predict runs/x --from - --format jsonl --stages",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files, folders (searched recursively) or glob patterns (quoted: 'photos/**/*.jpg')")
    p.add_argument("--from", dest="from_list", metavar="LIST",
                   help="also read inputs from this file, one per line (- reads stdin)")
    p.add_argument("--format", default="table", choices=("table", "csv", "jsonl"),
                   help="table (default): one line per image; csv: a header, then path, label, p_<class> "
                        "(and s<k>_<class> with --stages), error; jsonl: one JSON object per image")
    p.add_argument("--json", action="store_true", help="the same as --format jsonl")
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="emotions listed per image in the table and in the JSON 'top' list (default 3)")
    p.add_argument("--stages", action="store_true",
                   help="also each stage's own prediction (stages numbered 1..S, with the image blocks each reads)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per forward pass (default: the run's data.eval_batch_size)")
    _device_options(p)
    p.set_defaults(func=cmd_predict)


def _add_zeroshot(sub: Subparsers) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot CLIP baseline with the label space's templates")
    _with_config(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default test)")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.set_defaults(func=cmd_zeroshot)


def _add_sweep(sub: Subparsers) -> None:
    p = sub.add_parser("sweep", help="run a grid of methods x datasets x overrides x seeds; mean ± std tables")
    p.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("--out", required=True, help="sweep directory (re-running it finishes missing runs only)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every run")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the per-epoch summaries stay)")
    p.add_argument("--launcher", choices=("slurm",), default=None,
                   help="submit the unfinished runs as a SLURM job array (settings under the sweep file's "
                        "'slurm:' key; needs hclafter[slurm]) instead of running them here")
    p.add_argument("--wait", action="store_true", help="with --launcher: wait for the jobs, then write the tables")
    p.add_argument("--collect", action="store_true",
                   help="write the tables of a submitted sweep once every run has finished (lists those that have not)")
    p.add_argument("--rerun-changed", action="store_true",
                   help="run again from scratch the runs made with other settings than the sweep now plans "
                        "(otherwise they are refused by name)")
    p.set_defaults(func=cmd_sweep)


def _add_report(sub: Subparsers) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of a finished run or of a sweep")
    p.add_argument("run_dir", metavar="DIR",
                   help="a finished run (writes DIR/report.html) or a sweep directory (its report.html and every "
                        "finished run's)")
    p.set_defaults(func=cmd_report)


def _add_bench(sub: Subparsers) -> None:
    p = sub.add_parser("bench", help="speed/memory/FLOP ratios: HybridCascade vs LaFTer vs Cascade-CLIP (ViT-B-32)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to time (default cpu)")
    p.add_argument("--batch", type=int, default=32, help="images per timed batch (default 32)")
    p.add_argument("--prompts", type=int, default=50,
                   help="visual prompt tokens of the timed models (default 50)")
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


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="a run as a Hugging Face model directory or an ONNX graph")
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("--format", required=True, choices=("hf", "onnx"),
                   help="hf: config.json + model.safetensors + README.md model card; onnx: images -> fused "
                        "probabilities and per-stage logits (needs hclafter[onnx])")
    p.add_argument("out", help="output directory (hf) or .onnx file")
    p.add_argument("--include-backbone", action="store_true",
                   help="hf: embed the CLIP image tower instead of referencing its weights file by name and hash")
    p.set_defaults(func=cmd_export)


def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="a local web demo of a run (needs hclafter[serve])")
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    _device_options(p, precision=False)
    p.set_defaults(func=cmd_serve)


def _add_data(sub: Subparsers) -> None:
    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    p = data_sub.add_parser("check", help="validate a dataset root without training: counts per class and split, "
                                          "missing/unreadable files, unknown classes, malformed lines")
    p.add_argument("--format", required=True, help="dataset format (emotion6, emoset, fi, manifest, ...)")
    p.add_argument("root", help="dataset root (or manifest file)")
    _with_config(p)
    p.add_argument("--skip-invalid", action="store_true", help="judge as a run with data.skip_invalid=true would")
    p.add_argument("--limit", type=int, default=50, help="problems listed in full (default 50)")
    p.set_defaults(func=cmd_data_check)
    p = data_sub.add_parser("prepare", help="decode a run config's images once into the pre-decoded image store "
                                            "(training does it on first use unless data.image_store=off)")
    _with_config(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)


def build_parser() -> argparse.ArgumentParser:
    """The ``hclafter`` parser: each command registers its own options (``_add_<command>``)."""
    parser = Parser(prog="hclafter", description=DESCRIPTION, epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hclafter {__version__}",
                        help="print the version and exit")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)  # a bare `hclafter` explains itself
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add in (_add_train, _add_eval, _add_analyze, _add_predict, _add_zeroshot, _add_sweep, _add_report,
                _add_bench, _add_export, _add_serve, describe.add_parser, demo.add_parser, _add_data):
        add(sub)
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
    from ..models.backbone import BackboneError
    from ..data import DataError
    from ..data.images import ImageError
    from ..core.files import RunError
    from ..core.runtime import DeviceError
    from ..models.text import TextCorpusError
    from ..engine.training import TrainingInterrupted

    try:
        return args.func(args)
    except (ConfigError, DataError, ImageError, BackboneError, RunError, DeviceError, TextCorpusError,
            describe.DescribeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: missing, a folder, read-only, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, the permissions and the free space, then run the "
              "command again", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
