"""A seeded generator of small labelled emotion images with per-image vote-like distributions.

Each class has a colour (neighbouring classes on the wheel have similar colours), a stripe
frequency and a shape; an image blends the colours of its distribution, so wheel neighbours
are ambiguous, as in real vote data. Used by the tests and the tiny configs; nothing here is
meant to resemble real photographs.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DataConfig
from .data import DataError, Sample, write_manifest
from .emotions import Wheel, strategy1


def _vote_distribution(wheel: Wheel, label: int, rng: np.random.Generator, votes: int = 15) -> np.ndarray:
    """Simulated annotator votes drawn around the label on the wheel; the label always wins."""
    counts = rng.multinomial(votes, strategy1(wheel, label, sigma=0.8, epsilon=0.05))
    counts[label] = counts.max() + 1
    return counts / counts.sum()


def _render(wheel: Wheel, label: int, dist: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    c = wheel.num_classes
    palette = np.array([colorsys.hsv_to_rgb(i / c, 0.75, 0.95 if wheel.polarity[i] else 0.55) for i in range(c)])
    colour = dist @ palette
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (label + 2) * (xx + yy) + rng.uniform(0, 2 * np.pi))
    img = colour[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    if wheel.polarity[label]:
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    else:
        mask = (np.abs(xx - cx) + np.abs(yy - cy)) < r
    img[mask] = 1.0 - img[mask]
    img += rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def generate_synthetic(root: Path, wheel: Wheel, per_class: int, image_size: int, seed: int) -> Path:
    """Write ``images/<class>/<n>.png`` and ``manifest.csv`` under ``root``; return the manifest."""
    rng = np.random.default_rng(seed)
    samples = []
    for label, name in enumerate(wheel.classes):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            dist = _vote_distribution(wheel, label, rng)
            path = root / "images" / name / f"{n:04d}.png"
            Image.fromarray(_render(wheel, label, dist, image_size, rng)).save(path)
            samples.append(Sample(f"images/{name}/{n:04d}.png", label, tuple(dist.tolist())))
    manifest = root / "manifest.csv"
    write_manifest(manifest, samples, wheel)
    return manifest


def ensure_synthetic(cfg: DataConfig, wheel: Wheel, cache_dir: Path) -> Path:
    """The synthetic dataset's manifest, generating it once per parameter set (atomically)."""
    s = cfg.synthetic
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
    else:
        key = json.dumps({"wheel": wheel.classes, "per_class": s.per_class, "size": s.image_size, "seed": s.seed, "v": 1})
        root = cache_dir / "synthetic" / hashlib.sha256(key.encode()).hexdigest()[:12]
    manifest = root / "manifest.csv"
    if manifest.is_file():
        return manifest
    if root.is_dir() and any(root.iterdir()):
        raise DataError(f"data.root: {root} exists without a manifest.csv; give an empty or new folder "
                        "for the synthetic data")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        generate_synthetic(tmp, wheel, s.per_class, s.image_size, s.seed)
        if root.is_dir():
            root.rmdir()
        os.replace(tmp, root)
    except OSError:
        if not manifest.is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
