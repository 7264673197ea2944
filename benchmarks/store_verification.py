"""What verifying the image store costs, against an epoch of the demo (issue 24): the demo's
HybridCascade-LaFTer run (toy CLIP, the "mixed" world) with its image store, in a scratch folder.

    PYTHONPATH=src .venv/bin/python benchmarks/store_verification.py > store_verification.json

Prints JSON: the store's rows and bytes, the time of opening it warm (every row the run reads
checked against its digest, and its file's stamp), of hashing alone, and of the demo's training
epochs (phase 1: adapters and fusion; phase 2: also prompts, LayerNorms, NGA and classifier through
the tower; the steps only, not the validation), medians of ``--repeats`` rounds and ``--epochs`` runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hclafter.apps.demo import demo_config
from hclafter.core.config import PhaseConfig
from hclafter.core.runtime import cache_dir_of
from hclafter.data import load_splits
from hclafter.data.store import ImageStore, resize_steps, side, stored_datasets
from hclafter.engine import runfiles
from hclafter.engine.inputs import image_datasets
from hclafter.engine.run import train_run
from hclafter.models.backbone import backbone_from_config

PHASES = {"phase 1": ["stage_adapters", "fusion"],
          "phase 2": ["stage_adapters", "fusion", "nga", "prompts", "layernorms", "classifier"]}


def median_time(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="runs of one epoch per phase")
    args = parser.parse_args()
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(Path(tmp), device="cpu")
        backbone = backbone_from_config(cfg.backbone)
        cache = cache_dir_of(cfg)
        images = image_datasets(cfg, backbone, load_splits(cfg.data, cfg.seed, cache))
        stored_datasets(images, backbone.preprocess_cfg, cfg.data, cache, progress=False)  # decoded once
        paths = sorted({s.path for ds in images.values() for s in ds.samples})
        h, w = side(backbone.preprocess_cfg)
        steps = resize_steps(backbone.preprocess_cfg)
        store = ImageStore.open(paths, steps, (3, h, w), cache)
        rows = [store.row_of[p] for p in paths]
        out["store"] = {"rows": len(rows), "bytes_per_row": store.file.records.dtype.itemsize}
        out["open_and_verify_s"] = median_time(
            lambda: ImageStore.open(paths, steps, (3, h, w), cache).update(paths, steps, progress=False), args.repeats)
        out["hash_only_s"] = median_time(lambda: store.file.bad_rows(rows), args.repeats)
        out["epoch_s"] = {}
        for name, groups in PHASES.items():
            epochs = []
            for repeat in range(args.epochs):
                cfg = demo_config(Path(tmp), device="cpu")
                cfg.train.phases, cfg.train.steps, cfg.train.log_with = [PhaseConfig(1, groups)], None, []
                run = Path(tmp) / "runs" / f"{name}-{repeat}"
                train_run(cfg, run, progress=False)
                epochs.append(runfiles.read_records(run)[0]["time_s"])  # the epoch's steps, not its validation
            out["epoch_s"][name] = statistics.median(epochs)
        out["verify_over_epoch"] = {name: out["open_and_verify_s"] / t for name, t in out["epoch_s"].items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
