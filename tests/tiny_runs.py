"""Short tiny training runs for tests of the tools that take a finished run (export, serve, sweeps)."""
from pathlib import Path

from hclafter.apps.cli import main

from .conftest import TINY_CONFIG

# Two epochs that train everything the tiny config trains: enough to make every weight non-initial.
FAST = ["train.phases=[{epochs: 2, train: [stage_adapters, fusion, nga, prompts, layernorms, classifier]}]",
        "text.steps=100"]


def train_tiny(out: Path, cache_dir: Path, *overrides: str) -> Path:
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}",
                 *FAST, *overrides]) == 0
    return out
