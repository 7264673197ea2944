"""Per-layer features of a frozen, un-prompted encoder, computed once and memory-mapped.

When nothing in the image tower trains (no prompts, LayerNorms or backbone weights) and the view
is deterministic, every epoch would re-encode the same images to the same features. They are
stored on disk instead, keyed by backbone identity, extraction layers, transform and image file
identity, and shared by every epoch and every run (of a sweep) with the same key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .config import Config
from .data import EmotionImages, make_loader
from .emotions import Wheel
from .training import trained_groups

ENCODER_GROUPS = {"prompts", "layernorms", "backbone"}


def cache_applies(cfg: Config) -> bool:
    """Whether the image tower's output is fixed for the whole run."""
    tuned = set().union(*(trained_groups(p, cfg.train.train_backbone) for p in cfg.train.phases))
    return (cfg.train.feature_cache and cfg.model.method == "hybrid" and cfg.model.prompt_tokens == 0
            and cfg.train.supervision == "labels" and not tuned & ENCODER_GROUPS)


def cache_key(identity: dict, layers: Sequence[int], preprocess_cfg, paths: Sequence[str]) -> str:
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    transform = dataclasses.asdict(preprocess_cfg) if dataclasses.is_dataclass(preprocess_cfg) else repr(preprocess_cfg)
    blob = json.dumps([identity, list(layers), transform, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.no_grad()
def layer_feature_file(model: torch.nn.Module, images: EmotionImages, key: str, cache_dir: Path, batch_size: int,
                       device: torch.device, progress: bool = True) -> np.ndarray:
    """[N, layers, D] features of every image, memory-mapped from ``cache_dir/features/<key>.npy``
    (computed and written atomically on first use)."""
    path = cache_dir / "features" / f"{key}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = []
        model.eval()
        for batch in tqdm(make_loader(images, batch_size, False, 0), desc="caching features", leave=False,
                          disable=not progress):
            chunks.append(model.layer_features(batch["image"].to(device)).transpose(0, 1).float().cpu().numpy())
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.concatenate(chunks))
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


class CachedFeatures(Dataset):
    """The items of an EmotionImages dataset with its images replaced by cached layer features
    ([layers, D] under the same "image" key); labels and distributions are the dataset's own.
    ``rows[i]`` is the row of the dataset's i-th image in ``features``."""

    def __init__(self, images: EmotionImages, features: np.ndarray, rows: Sequence[int]) -> None:
        if len(rows) != len(images):
            raise ValueError(f"{len(rows)} feature rows for {len(images)} images")
        self.images, self.features, self.rows = images, features, list(rows)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.from_numpy(np.array(self.features[self.rows[index]])),
                "label": self.images.samples[index].label, "distribution": self.images.distributions[index],
                "index": index}


def cached_datasets(model: torch.nn.Module, datasets: dict[str, EmotionImages], wheel: Wheel, transform,
                    identity: dict, preprocess_cfg, cache_dir: Path, batch_size: int, device: torch.device,
                    progress: bool = True) -> dict[str, CachedFeatures]:
    """Every split backed by one feature file over all the dataset's images (sorted by path), so
    runs with other splits of the same images (other seeds of a sweep) share it."""
    everything = sorted({s for ds in datasets.values() for s in ds.samples}, key=lambda s: s.path)
    row = {s.path: i for i, s in enumerate(everything)}
    key = cache_key(identity, model.extraction_layers, preprocess_cfg, [s.path for s in everything])
    features = layer_feature_file(model, EmotionImages(everything, wheel, transform), key, cache_dir, batch_size,
                                  device, progress)
    return {split: CachedFeatures(ds, features, [row[s.path] for s in ds.samples]) for split, ds in datasets.items()}
