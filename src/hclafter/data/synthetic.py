"""The ``synthetic`` data format: a seeded, labelled emotion dataset with per-image distributions.

For the Mikels-8 label space (the format's default) the images come from the synthetic emotion
world (:mod:`hclafter.data.world`): each emotion carried by its own visual cues, ambiguous between
wheel neighbours, with simulated vote distributions. Other label spaces get simple generic
images: a colour per class (neighbouring classes on the wheel have similar colours), a stripe
frequency and a shape, blended by the image's distribution. Used by the demo, the tests and the
tiny configs; nothing here is meant to resemble real photographs.
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

from ..core.config import DataConfig
from ..core.emotions import MIKELS8, Wheel, strategy1
from ..core.files import write_json
from ..core.integrity import IntegrityError, file_digests, rebuild_warning, verify_files
from .readers import DataError, Sample, write_manifest
from .world import generate
from .worlds import load_world

GENERATOR_VERSION = 3  # part of the cache key: bump when the images change


def _vote_distribution(wheel: Wheel, label: int, rng: np.random.Generator, votes: int = 15) -> np.ndarray:
    """Simulated annotator votes drawn around the label on the wheel; the label always wins."""
    counts = rng.multinomial(votes, strategy1(wheel, label, sigma=0.8, epsilon=0.05))
    counts[label] = counts.max() + 1
    return counts / counts.sum()


def _render_generic(wheel: Wheel, label: int, dist: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
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


def generate_synthetic(root: Path, wheel: Wheel, per_class: int, image_size: int, seed: int,
                       world: str = "wild") -> Path:
    """Write ``images/<class>/<n>.png`` and ``manifest.csv`` under ``root``; return the manifest.

    Mikels-8 images come from the emotion world (``world.generate(per_class, image_size, seed)``)
    under the named ``world``'s conditions; the manifest's ``distribution`` column holds each
    image's vote distribution.
    """
    samples = []
    if wheel.classes == MIKELS8.classes:
        conditions = load_world(world)
        items = [(im.label, im.image, im.distribution) for im in generate(per_class, image_size, seed, conditions)]
    else:
        rng = np.random.default_rng(seed)
        items = []
        for label in range(wheel.num_classes):
            for _ in range(per_class):
                dist = _vote_distribution(wheel, label, rng)
                items.append((label, _render_generic(wheel, label, dist, image_size, rng), dist))
    counters = [0] * wheel.num_classes
    for label, image, dist in items:
        name, n = wheel.classes[label], counters[label]
        counters[label] += 1
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / name / f"{n:04d}.png")
        samples.append(Sample(f"images/{name}/{n:04d}.png", label, tuple(float(p) for p in dist)))
    manifest = root / "manifest.csv"
    write_manifest(manifest, samples, wheel)
    return manifest


def ensure_synthetic(cfg: DataConfig, wheel: Wheel, cache_dir: Path) -> Path:
    """The synthetic dataset's manifest, generating it once per parameter set (atomically).

    The parameters and the sha256 of every file are stamped into ``synthetic.json`` beside the
    manifest and checked on every use. In the cache, data that fails the check is generated again
    (the same images: they are seeded), after a warning naming the file; under a ``data.root`` it is
    an error, as is a root holding data generated with other parameters, never silently re-used.
    """
    s = cfg.synthetic
    params = {"wheel": list(wheel.classes), "per_class": s.per_class, "size": s.image_size, "seed": s.seed,
              "v": GENERATOR_VERSION}
    if wheel.classes == MIKELS8.classes:
        params["world"] = s.world
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
    else:
        key = json.dumps({**params, "wheel": wheel.classes})
        root = cache_dir / "synthetic" / hashlib.sha256(key.encode()).hexdigest()[:12]
    manifest, stamp = root / "manifest.csv", root / "synthetic.json"
    if manifest.is_file():
        try:
            _check_stamp(root, params)
            return manifest
        except IntegrityError as e:
            if cfg.root is not None:
                raise DataError(f"data.root: {e}; give an empty or new folder, or delete {root} to generate the "
                                "data again") from None
            rebuild_warning(stamp, f"the synthetic data fails verification ({e})")
            shutil.rmtree(root)
    if root.is_dir() and any(root.iterdir()):
        raise DataError(f"data.root: {root} exists without a manifest.csv; give an empty or new folder "
                        "for the synthetic data")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        generate_synthetic(tmp, wheel, s.per_class, s.image_size, s.seed, s.world)
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / "synthetic.json", {"params": params, "sha256": file_digests(tmp, names)})
        if root.is_dir():
            root.rmdir()
        os.replace(tmp, root)
    except OSError:
        if not manifest.is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _check_stamp(root: Path, params: dict) -> None:
    """IntegrityError unless the data under ``root`` is what ``synthetic.json`` says was generated
    with ``params``."""
    stamp = root / "synthetic.json"
    try:
        saved = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{stamp} is unreadable ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("sha256"), dict) or "params" not in saved:
        raise IntegrityError(f"{stamp} does not record the data's parameters and sha256")
    if saved["params"] != params:
        raise IntegrityError(f"{root} holds synthetic data generated with other settings "
                             f"({json.dumps(saved['params'])}, now {json.dumps(params)})")
    verify_files(root, saved["sha256"], stamp)
