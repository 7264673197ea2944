"""Shared fixtures: tiny random open_clip models and synthetic data, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

# `make test` runs one pytest-xdist worker per core: each worker (and every process a test starts,
# which inherits the variable) gets its share of the cores, not all of them, or the workers'
# threads would contend. Set before torch is imported, which reads it once.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

from hclafter.models.backbone import load_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"

# 12 image blocks so the default stages apply; everything else as small as possible.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 12, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


def tiny_tower_flops(prompts: int = 0) -> int:
    """FLOPs of TINY_CFG's image tower on one image, counted by hand: the patch convolution; per block
    the QKV product, QKᵀ and AV, the out-projection and the MLP over the class, patch and ``prompts``
    tokens; then the final projection."""
    vision = TINY_CFG["vision_cfg"]
    W, L, p, D = vision["width"], vision["layers"], vision["patch_size"], TINY_CFG["embed_dim"]
    M, patches = int(W * vision["mlp_ratio"]), (vision["image_size"] // p) ** 2
    T = 1 + patches + prompts
    return 2 * patches * 3 * p * p * W + L * (2 * T * W * 3 * W + 4 * T * T * W + 2 * T * W * W + 4 * T * W * M) + 2 * W * D


@pytest.fixture(scope="session")
def tiny_backbone():
    return load_backbone("tiny", model_cfg=TINY_CFG)


@pytest.fixture(scope="session")
def vitb32():
    return load_backbone("ViT-B-32")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
