"""The ``hclafter`` command: its options and help, and the dispatch to the command's handler.

Every command's handler is a function of the app module of its group (``runs``, ``data``,
``sweep``, ``demo``, ...), imported only when the command runs: ``hclafter --help`` loads no
model code.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

from ..version import __version__

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
  hclafter tune -c configs/tiny.yaml --trials 20 --out runs/tune   # Optuna on validation, then test once
  hclafter data check --format fi /data/FI"""

# Options that mean the same in every command, explained once: an option of a command registered
# elsewhere (demo, describe) without its own help gets this one.
# hclafter demo's local worker processes: two one-thread processes beat one two-thread process on
# 2 CPU cores (the toy CLIP's steps are small; BENCHMARKS.md, 2026-12-05).
DEMO_WORKERS = 2
COMMON_HELP = {
    "--device": "where to compute: auto (a GPU if there is one), cpu or cuda",
    "--precision": "numeric precision of the forward pass (bf16/fp16: autocast); default: the run's own",
    "--quiet": "no progress bars (the per-epoch summaries stay)",
    "--json": "print JSON instead of a table",
    "run_dir": "a finished run directory (e.g. runs/demo/runs/hybrid)",
}


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
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip drawing the run's figures (about 5 s for a tiny run): `hclafter report RUN` draws "
                        "them later")
    p.set_defaults(func=("runs", "cmd_train"))


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
    p.set_defaults(func=("runs", "cmd_eval"))


def _add_analyze(sub: Subparsers) -> None:
    p = sub.add_parser("analyze", help="what each layer and stage knows: linear probes per block of the frozen "
                                       "tower beside the trained stages, per-stage per-class accuracy, stage "
                                       "disagreements (Markdown, JSON, PNG/SVG plot)")
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    _device_options(p, precision=False)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=("analysis", "cmd_analyze"))


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
    p.set_defaults(func=("runs", "cmd_predict"))


def _add_zeroshot(sub: Subparsers) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot CLIP baseline with the label space's templates")
    _with_config(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default test)")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.set_defaults(func=("runs", "cmd_zeroshot"))


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
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run the runs in N local processes, each with 1/N of the torch threads (default 1; on CPU "
                        "with a small backbone 2 is faster on 2 cores, see BENCHMARKS.md; not with --launcher)")
    p.set_defaults(func=("launchers", "cmd_sweep"))


def _add_tune(sub: Subparsers) -> None:
    p = sub.add_parser("tune", help="search a method's settings (its config's tune.space) on validation with Optuna, "
                                    "then train and test the chosen configuration once per seed (needs hclafter[tune])",
                       description="Trials are runs in OUT/trials/NNNN scored on the validation split (tune.objective), "
                                   "their test split never predicted; TPE seeded with the config's seed, a median "
                                   "pruner on each trial's validations. Writes OUT/best.yaml (hclafter train -c takes "
                                   "it), OUT/best/seedK, OUT/tune.json and OUT/report.html. Running the same command "
                                   "again continues a stopped study.")
    _with_config(p)
    p.add_argument("--out", required=True, help="study folder (re-running the command continues the study in it)")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="trials in the study in all, those already in its storage included")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="seeds the chosen configuration is trained and tested with (default 1: the config's seed)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="where the study lives (default OUT/study.db, SQLite): any SQLAlchemy URL (e.g. "
                        "postgresql://...), or a journal file (a path ending in .log or .jsonl)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="local processes running trials at once, sharing the storage (default 1)")
    p.add_argument("--study", default=None, metavar="NAME",
                   help="the study's name in the storage (default hclafter-tune)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the per-round lines stay)")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="no figures for the chosen configuration's runs (hclafter report draws them later)")
    p.set_defaults(func=("tune", "cmd_tune"))


def _add_report(sub: Subparsers) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of a finished run or of a sweep")
    p.add_argument("run_dir", metavar="DIR",
                   help="a finished run (writes DIR/report.html) or a sweep directory (its report.html and every "
                        "finished run's)")
    p.set_defaults(func=("report", "cmd_report"))


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
    p.add_argument("--step", action="store_true",
                   help="instead: only the hybrid's training step as a run takes it against a bare PyTorch step of "
                        "the same tower, prompts and batch (with --compile BACKEND: both compiled)")
    p.add_argument("--epoch", type=int, metavar="IMAGES",
                   help="instead: end-to-end training images/s over IMAGES synthetic 640x480 JPEGs, decoded in "
                        "every epoch vs read from the image store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--onnx", action="store_true",
                   help="instead: ONNX Runtime vs PyTorch latency per image of HybridCascade-LaFTer on CPU "
                        "(needs hclafter[onnx])")
    p.set_defaults(func=("bench", "cmd_bench"))


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="a run as a Hugging Face model directory or an ONNX graph")
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("--format", required=True, choices=("hf", "onnx"),
                   help="hf: config.json + model.safetensors + README.md model card; onnx: images -> fused "
                        "probabilities and per-stage logits (needs hclafter[onnx])")
    p.add_argument("out", help="output directory (hf) or .onnx file")
    p.add_argument("--include-backbone", action="store_true",
                   help="hf: embed the CLIP image tower instead of referencing its weights file by name and hash")
    p.set_defaults(func=("export", "cmd_export"))


def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="a local web demo of a run (needs hclafter[serve])")
    p.add_argument("run_dir", help=COMMON_HELP["run_dir"])
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    _device_options(p, precision=False)
    p.set_defaults(func=("serve", "cmd_serve"))


def _add_demo(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="every method, baseline and the control on a synthetic emotion world with the "
                                    "shipped toy CLIP, over seeds (no download; about 7 minutes on 2 CPU cores with "
                                    "3 seeds, under 3 with --seeds 1)",
                       description="The demo is a sweep: zero-shot CLIP, the text-only classifier, the linear probe, Tip-Adapter-F, "
                                   "CLIP-Adapter, CoOp, LaFTer (label-free), LaFTer-sup, the capacity-matched control "
                                   "LaFTer-sup + adapter, HybridCascade-LaFTer and the "
                                   "Cascade-CLIP-style baseline (--ablations: two of the hybrid's ablations too), each with its own method "
                                   "config and the shipped toy CLIP, on a named synthetic world. It prints the table "
                                   "(mean ± std over seeds, paired differences with the headline method, verdicts) and "
                                   "writes a Markdown and an HTML report. Nothing is downloaded. The world is "
                                   "synthetic: its numbers show the methods working end to end, not what they achieve "
                                   "on real photographs.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to compute")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method (default 3; 1 for a quick look)")
    p.add_argument("--world", default=None,
                   help="the synthetic world: the name of a file of configs/worlds/ (default: the demo's, which it "
                        "names as it starts)")
    p.add_argument("--workers", type=int, default=DEMO_WORKERS, metavar="N",
                   help=f"runs in N local processes, each with 1/N of the torch threads (default {DEMO_WORKERS}: the "
                        "fastest on 2 CPU cores, see BENCHMARKS.md; a run's threads are in its run.json)")
    p.add_argument("--ablations", action="store_true",
                   help="also the hybrid without adapters and with one shared adapter (is it the layers or the adapter "
                        "capacity?); about 4.5 minutes more on 2 CPU cores with 3 seeds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=("demo", "cmd_demo"))


def _add_describe(sub: Subparsers) -> None:
    p = sub.add_parser(
        "describe", help="write class descriptions (JSON) with an OpenAI-compatible LLM endpoint",
        description="Ask an OpenAI-compatible chat-completions endpoint LaFTer-style questions about each "
                    "class and write {class: [sentence, ...]} for text.descriptions. Sentences are "
                    "de-duplicated case-insensitively (one produced for several classes is dropped from all) "
                    "and ones over CLIP's 77-token context are dropped. Progress is saved to OUT.partial.json "
                    "after every request; re-running the same command resumes.",
        epilog="Environment: HCLAFTER_LLM_BASE_URL (else OPENAI_BASE_URL), HCLAFTER_LLM_MODEL, "
               "HCLAFTER_LLM_API_KEY (else OPENAI_API_KEY). Flags win over the environment.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", metavar="A,B,C", help="comma-separated class names")
    which.add_argument("--label-space", metavar="NAME",
                       help="use a built-in label space's classes (mikels8, ekman6 or polarity2)")
    p.add_argument("--out", required=True, metavar="PATH", help="descriptions JSON to write")
    p.add_argument("--per-question", type=int, default=10, metavar="N",
                   help="captions asked for per question, for each of the questions asked about a class (default 10)")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="API root, e.g. http://HOST:PORT/v1 (env HCLAFTER_LLM_BASE_URL, else OPENAI_BASE_URL)")
    p.add_argument("--model", default=None, help="model name (env HCLAFTER_LLM_MODEL)")
    p.add_argument("--api-key", default=None,
                   help="bearer token (env HCLAFTER_LLM_API_KEY, else OPENAI_API_KEY); optional for local servers")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for each request in total (default 120)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries on connection errors, 429 and 5xx, with exponential backoff (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=("describe", "cmd_describe"))


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
    p.set_defaults(func=("data", "cmd_data_check"))
    p = data_sub.add_parser("prepare", help="decode a run config's images once into the pre-decoded image store "
                                            "(training does it on first use unless data.image_store=off)")
    _with_config(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=("data", "cmd_data_prepare"))


def build_parser() -> argparse.ArgumentParser:
    """The ``hclafter`` parser: each command registers its own options (``_add_<command>``)."""
    parser = Parser(prog="hclafter", description=DESCRIPTION, epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hclafter {__version__}",
                        help="print the version and exit")
    parser.set_defaults(func=None)  # a bare `hclafter` explains itself
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add in (_add_train, _add_eval, _add_analyze, _add_predict, _add_zeroshot, _add_sweep, _add_tune, _add_report,
                _add_bench, _add_export, _add_serve, _add_describe, _add_demo, _add_data):
        add(sub)
    return parser


def command(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The handler of the parsed command, imported from its app module."""
    module, name = args.func
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    """A command's warnings as one line each (Python's add the source file and line of the call)."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides may stand anywhere on the line (also after --out), which plain argparse rejects.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.func is None:
        parser.print_help()
        return 0
    from ..core.config import ConfigError
    from ..core.files import RunError
    from ..core.runtime import DeviceError
    from ..data import DataError
    from ..data.images import ImageError
    from ..engine.loop import TrainingInterrupted
    from ..models.backbone import BackboneError
    from ..models.text import TextCorpusError
    from .describe import DescribeError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return command(args)(args)
    except (ConfigError, DataError, ImageError, BackboneError, RunError, DeviceError, TextCorpusError,
            DescribeError) as e:
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
