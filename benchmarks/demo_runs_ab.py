"""The demo's speed changes measured side by side (issue 23), each on one demo run (world "mixed",
seed 0), variant A without the change and B with it (the demo as it is):

- ``phase_encoding``: HybridCascade-LaFTer, A ``train.feature_cache=false`` (the tower runs at every
  step and validation of phase 1), B phase 1 reads each image encoded once;
- ``coop_positions``: CoOp, A its text tower over all 77 positions, B up to the last prompt's end token;
- ``fused_adamw``: HybridCascade-LaFTer, A PyTorch's default AdamW on CPU (one small operation after
  another per parameter), B the fused one;
- ``no_tensorboard``: HybridCascade-LaFTer, A logging every step to TensorBoard, B no tracker.

    PYTHONPATH=src .venv/bin/python benchmarks/demo_runs_ab.py [--only NAME ...] > demo_runs_ab.json

A and B run at the same time, one thread each, one per core (``taskset``), then again with the cores
swapped, each in a fresh process on its own warm cache (data, image store and stage 1 made before
timing). Prints JSON: every run's wall seconds and test metrics, and per change the ratio B / A of
the summed times (the two rounds), with the test metrics' largest difference between A and B.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPARISONS = {"phase_encoding": "hybrid", "coop_positions": "coop", "fused_adamw": "hybrid", "no_tensorboard": "hybrid"}


def one_run(change: str, variant: str, out: Path, cache: Path) -> dict:
    """One demo run in this process (one thread), without ``change`` for variant A; returns its wall
    seconds and test metrics."""
    import torch

    import hclafter.models.coop as coop
    from hclafter.apps.demo import demo_config
    from hclafter.engine.run import train_run

    torch.set_num_threads(1)
    method = COMPARISONS.get(change, change)  # a change's run, or a method by name (the warm-up)
    cfg = demo_config(cache, method=method, seed=0)
    if variant == "A" and change == "coop_positions":
        coop.pooled_length = lambda clip, tokens: tokens.shape[1]
    elif variant == "A" and change == "phase_encoding":
        cfg.train.feature_cache = False
    elif variant == "A" and change == "fused_adamw":
        class Unfused(torch.optim.AdamW):
            def __init__(self, params, fused=None, **kwargs):
                super().__init__(params, **kwargs)
        torch.optim.AdamW = Unfused
    elif variant == "A" and change == "no_tensorboard":
        cfg.train.log_with = ["tensorboard"]
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = train_run(cfg, out, progress=False)
    return {"change": change, "method": method, "variant": variant, "wall_s": time.perf_counter() - started,
            "test_accuracy": summary["test"]["accuracy"], "test_kl": summary["test"]["ldl"]["kl"],
            "best_step": summary.get("best_step")}


def _child(change: str, variant: str, out: Path, cache: Path, core: int) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, __file__, "--one", change, variant, str(out),
                             str(cache)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(COMPARISONS), default=list(COMPARISONS),
                        help="the comparisons to run (default: all)")
    parser.add_argument("--one", nargs=4, metavar=("CHANGE", "VARIANT", "OUT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        change, variant, out, cache = args.one
        print(json.dumps(one_run(change, variant, Path(out), Path(cache))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for variant in "AB":  # data, image store and stage 1 made before anything is timed
            one_run("textonly", "B", root / f"warm{variant}", root / f"cache{variant}")
        runs = []
        for change in args.only:
            for cores in ((0, 1), (1, 0)):
                children = [_child(change, v, root / f"{change}{v}", root / f"cache{v}", c) for v, c in zip("AB", cores)]
                runs += [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    ratios = {}
    for change in args.only:
        mine = [r for r in runs if r["change"] == change]
        a, b = ([r for r in mine if r["variant"] == v] for v in "AB")
        ratios[change] = {"b_over_a": sum(r["wall_s"] for r in b) / sum(r["wall_s"] for r in a),
                          "accuracy_difference": max(abs(x["test_accuracy"] - y["test_accuracy"]) for x in a for y in b),
                          "kl_difference": max(abs(x["test_kl"] - y["test_kl"]) for x in a for y in b)}
    print(json.dumps({"machine": platform.processor() or platform.machine(), "runs": runs, "ratios": ratios},
                     indent=1))


if __name__ == "__main__":
    main()
