"""Two of the demo's speed changes measured side by side (issue 23), each on one demo run (world
"mixed", seed 0), variant A without the change and B with it:

- ``hybrid``: HybridCascade-LaFTer, A ``train.feature_cache=false`` (the tower runs at every step and
  validation of phase 1), B the default (phase 1 reads each image encoded once);
- ``coop``: CoOp, A its text tower over all 77 positions, B up to the last prompt's end token.

    PYTHONPATH=src .venv/bin/python benchmarks/demo_runs_ab.py > demo_runs_ab.json

A and B run at the same time, one thread each, one per core (``taskset``), then again with the cores
swapped, each in a fresh process on its own warm cache (data, image store and stage 1 made before
timing). Prints JSON: every run's wall seconds and test metrics, and per method the ratio B / A of
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

METHODS = ("hybrid", "coop")


def one_run(method: str, variant: str, out: Path, cache: Path) -> dict:
    """One demo run in this process (one thread); returns its wall seconds and test metrics."""
    import torch

    import hclafter.models.coop as coop
    from hclafter.apps.demo import demo_config
    from hclafter.engine.run import train_run

    torch.set_num_threads(1)
    cfg = demo_config(cache, method=method, seed=0)
    if variant == "A" and method == "coop":
        coop.pooled_length = lambda clip, tokens: tokens.shape[1]
    elif variant == "A":
        cfg.train.feature_cache = False
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = train_run(cfg, out, progress=False)
    return {"method": method, "variant": variant, "wall_s": time.perf_counter() - started,
            "test_accuracy": summary["test"]["accuracy"], "test_kl": summary["test"]["ldl"]["kl"],
            "best_step": summary.get("best_step")}


def _child(method: str, variant: str, out: Path, cache: Path, core: int) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, __file__, "--one", method, variant, str(out),
                             str(cache)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "VARIANT", "OUT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, variant, out, cache = args.one
        print(json.dumps(one_run(method, variant, Path(out), Path(cache))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for variant in "AB":  # data, image store and stage 1 made before anything is timed
            one_run("textonly", "B", root / f"warm{variant}", root / f"cache{variant}")
        runs = []
        for method in METHODS:
            for cores in ((0, 1), (1, 0)):
                children = [_child(method, v, root / f"{method}{v}", root / f"cache{v}", c) for v, c in zip("AB", cores)]
                runs += [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    ratios = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        a, b = ([r for r in mine if r["variant"] == v] for v in "AB")
        ratios[method] = {"b_over_a": sum(r["wall_s"] for r in b) / sum(r["wall_s"] for r in a),
                          "accuracy_difference": max(abs(x["test_accuracy"] - y["test_accuracy"]) for x in a for y in b),
                          "kl_difference": max(abs(x["test_kl"] - y["test_kl"]) for x in a for y in b)}
    print(json.dumps({"machine": platform.processor() or platform.machine(), "runs": runs, "ratios": ratios},
                     indent=1))


if __name__ == "__main__":
    main()
