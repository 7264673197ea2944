"""Mixed precision stays close to fp32; two CPU processes (torchrun, gloo) give one correct run."""
import csv
import json
import subprocess
import sys

import numpy as np

import hclafter
from hclafter.core.config import load_config
from hclafter.engine.run import train_run

from .conftest import TINY_CONFIG

SHORT = ["data.synthetic.per_class=8", "text.steps=30",
         "train.phases=[{epochs: 1, train: [stage_adapters, fusion]}, {epochs: 1, train: [prompts, layernorms, classifier]}]"]
# bf16 keeps 8 bits of mantissa: predicted probabilities of the tiny model move by at most this much.
BF16_TOLERANCE = 0.02


def test_bf16_inference_stays_within_tolerance_of_fp32(tmp_path, cache_dir):
    out = tmp_path / "run"
    train_run(load_config([TINY_CONFIG], [*SHORT, f"cache_dir={cache_dir}"]), out, progress=False)
    images = [row["path"] for row in csv.DictReader(open(out / "splits" / "test.csv"))]
    fp32 = hclafter.load_run(out).predict(images)
    bf16 = hclafter.load_run(out, precision="bf16").predict(images)
    assert np.abs(bf16.distributions - fp32.distributions).max() <= BF16_TOLERANCE
    assert np.abs(bf16.distributions - fp32.distributions).max() > 0  # bf16 really ran
    metrics = hclafter.load_run(out, precision="bf16").evaluate("test", progress=False)
    assert metrics["num_samples"] == len(images)


def test_bf16_training_runs(tmp_path, cache_dir):
    summary = train_run(load_config([TINY_CONFIG], [*SHORT, f"cache_dir={cache_dir}", "precision=bf16"]),
                        tmp_path / "run", progress=False)
    assert np.isfinite(summary["test"]["ldl"]["kl"])


def test_two_cpu_processes_train_one_run_and_count_every_test_image_once(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hclafter", "train",
           "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}", *SHORT]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1  # one report, from the first process
    # output to a pipe: no progress bars, and the epoch lines of the first process only
    assert "\r" not in done.stdout + done.stderr
    assert [line[:9] for line in done.stdout.splitlines() if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    summary = json.loads((out / "summary.json").read_text())
    test_images = len((out / "splits" / "test.csv").read_text().splitlines()) - 1
    assert summary["test"]["num_samples"] == test_images == summary["num_samples"]["test"]
    assert sum(map(sum, summary["test"]["confusion_matrix"])) == test_images
    predicted = [row["path"] for row in csv.DictReader(open(out / "predictions.csv"))]
    assert sorted(predicted) == sorted(row["path"] for row in csv.DictReader(open(out / "splits" / "test.csv")))
    assert len(list(out.parent.iterdir())) == 1  # one run directory
