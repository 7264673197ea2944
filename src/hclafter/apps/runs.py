"""The commands on runs: ``train``, ``eval``, ``predict`` and ``zeroshot``; :func:`train` is how every
app trains a run."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..core.config import Config, load_config, to_dict
from ..engine import runfiles


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


def train(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False, figures: bool = True) -> dict:
    """A run as ``hclafter train`` makes it: :func:`hclafter.engine.run.train_run` with the run's
    figures drawn before its summary is written (unless ``figures`` is false)."""
    from ..engine.run import train_run

    if not figures:
        return train_run(cfg, out_dir, progress, resume)
    from ..reporting.report import write_run_figures

    return train_run(cfg, out_dir, progress, resume, figures=write_run_figures)


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # Resuming, overrides apply to the run's own config (so only what they change differs from it).
    base = [out / runfiles.CONFIG] if args.resume and not args.config and (out / runfiles.CONFIG).is_file() else []
    cfg = load_config(args.config or base, args.overrides)
    _warn_inapplicable(cfg)
    summary = train(cfg, out, progress=not args.quiet, resume=args.resume, figures=args.figures)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun the first process reports
    selected = f" (best epoch {summary['best_epoch']} on val)" if "best_epoch" in summary else ""
    print(f"run written to {args.out}{selected}")
    print(_metrics_table(summary["test"]))
    warning = convergence_warning(summary)
    if warning is not None:
        print(warning, file=sys.stderr)
    return 0


def convergence_warning(summary: dict) -> Optional[str]:
    """What to tell the user when a trained run ends still improving (SPEC §11), else None."""
    from ..core.metrics import STILL_IMPROVING

    c = summary.get("convergence")
    if c is None or c["verdict"] != STILL_IMPROVING:
        return None
    steps = summary["steps"]
    if c["rise"] is None:
        return (f"warning: this run may still be improving: none of its {c['validations']} validation(s) lies before the "
                f"last 20 % of its {steps} steps, so its curve cannot show a plateau; give a budget in train.steps "
                "(it validates every tenth of the budget) or more epochs")
    return (f"warning: this run is still improving: best validation accuracy {100 * c['best_val_accuracy_before']:.1f} % "
            f"→ {100 * c['best_val_accuracy_last']:.1f} % in the last 20 % of its {steps} steps; train longer "
            f"(e.g. train.steps={2 * steps}) before comparing it")


def check_device_flags(args: argparse.Namespace) -> None:
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

    check_device_flags(args)
    try:
        return load_run(args.run_dir, args.device, getattr(args, "precision", None))
    except DeviceError as e:
        raise DeviceError(f"{e} (the run's own setting; on the command line use --device / --precision)") from None


def cmd_eval(args: argparse.Namespace) -> int:
    run = _load_run(args)
    if args.data is not None or args.overrides:
        from .crossdata import cross_dataset_config, describe_result, evaluate_on

        cfg = cross_dataset_config(args.run_dir, args.data, args.overrides)
        result = evaluate_on(run, cfg.data, args.split, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else
              describe_result(result) + "\n\n" + _metrics_table(result["metrics"]))
        return 0
    best = runfiles.read_summary(run.run_dir).get("best_epoch") if runfiles.is_finished(run.run_dir) else None
    metrics = run.evaluate(args.split, progress=not args.json)
    checkpoint = f"checkpoint of epoch {best} (selected on val)" if best else "the run's model"
    header = f"{run.run_dir}: {args.split} split, {metrics['num_samples']} images, {checkpoint}"
    if args.json:
        print(header, file=sys.stderr)
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{header}\n{_metrics_table(metrics)}")
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
    from ..engine.frozen import zeroshot_eval

    cfg = load_config(args.config, args.overrides)
    _warn_inapplicable(dataclasses.replace(cfg, mode="zeroshot"))
    metrics = zeroshot_eval(cfg, args.split, progress=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else _metrics_table(metrics))
    return 0
