"""Datasets and loaders over checked splits.

Every sample carries its own label and distribution, so shuffling can never pair an image with
another image's distribution.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.config import MAX_IMAGE_PIXELS, DataConfig
from ..core.emotions import Wheel, strategy1
from .images import ImageError, load_rgb
from .readers import DataError, Sample

class EmotionImages(Dataset):
    """Images with label, target distribution and index (its identity within the split)."""

    def __init__(self, samples: Sequence[Sample], wheel: Wheel, transform: Callable[[Image.Image], torch.Tensor],
                 distribution_source: str = "wheel", sigma: float = 1.0, epsilon: float = 0.1,
                 exclusion: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.samples = list(samples)
        self.transform, self.max_pixels = transform, max_pixels
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
            image = self.transform(load_rgb(sample.path, max_pixels=self.max_pixels))
        except ImageError as e:
            raise DataError(str(e)) from None
        return {"image": image, "label": sample.label, "distribution": self.distributions[index], "index": index}


def make_dataset(samples: Sequence[Sample], wheel: Wheel, transform: Callable, cfg: DataConfig) -> EmotionImages:
    d = cfg.distribution
    if d.source not in ("wheel", "dataset"):
        raise DataError(f"data.distribution.source: {d.source!r} is not one of wheel, dataset")
    return EmotionImages(samples, wheel, transform, d.source, d.sigma, d.epsilon, d.exclusion, cfg.max_image_pixels)


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
