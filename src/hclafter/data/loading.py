"""Datasets and loaders over checked splits, and the per-layer feature cache.

Every sample carries its own label and distribution, so shuffling can never pair an image with
another image's distribution.

Feature cache: when nothing in the image tower trains (no prompts, LayerNorms or backbone
weights) and the view is deterministic, every epoch would re-encode the same images to the same
features. They are stored on disk instead, keyed by backbone identity, extraction layers,
transform and image file identity, and shared by every epoch and every run (of a sweep) with the
same key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..core.config import Config, DataConfig, tuned_groups
from ..core.emotions import Wheel, strategy1
from ..models import method_class
from .images import ImageError, load_rgb
from .readers import DataError, Sample

class EmotionImages(Dataset):
    """Images with label, target distribution and index (its identity within the split)."""

    def __init__(self, samples: Sequence[Sample], wheel: Wheel, transform: Callable[[Image.Image], torch.Tensor],
                 distribution_source: str = "wheel", sigma: float = 1.0, epsilon: float = 0.1,
                 exclusion: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        table = np.stack([strategy1(wheel, c, sigma, epsilon, exclusion) for c in range(wheel.num_classes)])
        dists = []
        for s in self.samples:
            if distribution_source == "dataset":
                if s.distribution is None:
                    raise DataError(f"{s.path}: no per-image distribution, but data.distribution.source is "
                                    "'dataset'; use source 'wheel' for datasets without votes")
                dists.append(s.distribution)
            else:
                dists.append(table[s.label])
        self.distributions = torch.tensor(np.asarray(dists), dtype=torch.float32).reshape(len(self.samples), -1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            image = self.transform(load_rgb(sample.path))
        except ImageError as e:
            raise DataError(str(e)) from None
        return {"image": image, "label": sample.label, "distribution": self.distributions[index], "index": index}


def make_dataset(samples: Sequence[Sample], wheel: Wheel, transform: Callable, cfg: DataConfig) -> EmotionImages:
    d = cfg.distribution
    if d.source not in ("wheel", "dataset"):
        raise DataError(f"data.distribution.source: {d.source!r} is not one of wheel, dataset")
    return EmotionImages(samples, wheel, transform, d.source, d.sigma, d.epsilon, d.exclusion)


class EpochSampler(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """Shuffled loaders use an EpochSampler: call ``loader.sampler.set_epoch`` before each epoch."""
    sampler = EpochSampler(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


def eval_loader(dataset: Dataset, cfg: DataConfig, accelerator: Any = None) -> DataLoader:
    """The one evaluation loader: in split order, ``data.eval_batch_size``, prepared for the
    accelerator's processes when one is given."""
    loader = make_loader(dataset, cfg.eval_batch_size, False, 0, cfg.num_workers)
    return accelerator.prepare_data_loader(loader) if accelerator is not None else loader


ENCODER_GROUPS = {"prompts", "layernorms", "backbone"}


def cache_applies(cfg: Config) -> bool:
    """Whether the image tower's output is fixed for the whole run."""
    return (cfg.train.feature_cache and method_class(cfg.model.method).supports_feature_cache
            and cfg.model.prompt_tokens == 0 and cfg.train.supervision == "labels"
            and cfg.data.train_augment == "none" and not tuned_groups(cfg.train) & ENCODER_GROUPS)


def cache_key(identity: dict, layers: Sequence[int], preprocess_cfg, paths: Sequence[str]) -> str:
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    transform = dataclasses.asdict(preprocess_cfg) if dataclasses.is_dataclass(preprocess_cfg) else repr(preprocess_cfg)
    blob = json.dumps([identity, list(layers), transform, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.no_grad()
def layer_feature_file(model: torch.nn.Module, images: EmotionImages, key: str, cache_dir: Path, batch_size: int,
                       device: torch.device, progress: bool = True) -> np.ndarray:
    """[N, layers, D] features of every image, memory-mapped from ``cache_dir/features/<key>.npy``
    (computed and written atomically on first use; a file that is not such an array is recomputed
    with a warning)."""
    path = cache_dir / "features" / f"{key}.npy"
    if path.is_file():
        try:
            features = np.load(path, mmap_mode="r")
            if features.dtype == np.float32 and features.shape[:2] == (len(images), len(model.extraction_layers)):
                return features
            why = f"a {features.dtype} array of shape {features.shape}"
        except (ValueError, OSError) as e:  # objects (pickles are refused), a truncated or foreign file
            why = str(e)
        warnings.warn(f"{path}: feature-cache file unusable ({why}); recomputing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    model.eval()
    for batch in tqdm(make_loader(images, batch_size, False, 0), desc="caching features", leave=False,
                      disable=not progress):
        chunks.append(model.forward_features(batch["image"].to(device)).transpose(0, 1).float().cpu().numpy())
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
