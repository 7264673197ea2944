"""Samples, splits and loaders. Every sample carries its own label and distribution, so
shuffling can never pair an image with another image's distribution."""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig
from .emotions import Wheel, get_wheel, strategy1

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad dataset input, reported with the file and line."""


@dataclass(frozen=True)
class Sample:
    path: str  # absolute image path
    label: int
    distribution: Optional[tuple[float, ...]] = None  # per-image votes, in the wheel's class order


@dataclass
class DatasetSplits:
    wheel: Wheel
    splits: dict[str, list[Sample]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Sample]:
        return self.splits[split]


def read_manifest(path: Path, wheel: Wheel) -> list[tuple[Sample, Optional[str]]]:
    """CSV with columns ``path,label`` and optional ``split`` and ``distribution``.

    Paths are relative to the manifest's folder (or absolute); labels are class names; a
    distribution is space-separated probabilities in the label space's class order.
    """
    base = path.parent
    rows: list[tuple[Sample, Optional[str]]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: header lacks column(s) {sorted(missing)}; expected path,label[,split][,distribution]")
        for line, row in enumerate(reader, start=2):
            try:
                label = wheel.index(row["label"])
            except KeyError as e:
                raise DataError(f"{path}:{line}: {e.args[0]}") from None
            dist = None
            if row.get("distribution"):
                values = np.array([float(v) for v in row["distribution"].split()])
                if values.shape != (wheel.num_classes,) or (values < 0).any() or abs(values.sum() - 1) > 1e-3:
                    raise DataError(f"{path}:{line}: distribution must be {wheel.num_classes} non-negative "
                                    f"probabilities summing to 1, got {row['distribution']!r}")
                dist = tuple(float(v) for v in values / values.sum())
            split = row.get("split") or None
            if split is not None and split not in SPLITS:
                raise DataError(f"{path}:{line}: split {split!r} is not one of {SPLITS}")
            rows.append((Sample(str((base / row["path"]).resolve()), label, dist), split))
    if not rows:
        raise DataError(f"{path}: no samples")
    return rows


def write_manifest(path: Path, samples: Sequence[Sample], wheel: Wheel, split: Optional[str] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "distribution"])
        for s in samples:
            dist = " ".join(f"{p:.6g}" for p in s.distribution) if s.distribution is not None else ""
            writer.writerow([s.path, wheel.classes[s.label], split or "", dist])


def stratified_split(samples: Sequence[Sample], ratios: Sequence[float], seed: int) -> dict[str, list[Sample]]:
    """Per-class seeded shuffle, then train/val/test by ``ratios``; every non-empty class gets a
    validation sample when it has at least 3 images."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = np.random.default_rng(seed)
    out: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: s.path)
        rng.shuffle(items)
        n = len(items)
        n_val = max(1, round(ratios[1] * n)) if n >= 3 else 0
        n_test = max(1, round(ratios[2] * n)) if n >= 3 and ratios[2] > 0 else 0
        out["val"] += items[:n_val]
        out["test"] += items[n_val:n_val + n_test]
        out["train"] += items[n_val + n_test:]
    return out


def load_splits(cfg: DataConfig, seed: int, cache_dir: Path) -> DatasetSplits:
    """Read the configured dataset and split it (official split where the data has one)."""
    wheel = get_wheel(cfg.label_space)
    if cfg.format == "synthetic":
        from .synthetic import ensure_synthetic

        manifest = ensure_synthetic(cfg, wheel, cache_dir)
    elif cfg.format == "manifest":
        if cfg.root is None:
            raise DataError("data.root must name a manifest CSV (or a folder holding manifest.csv) for format 'manifest'")
        root = Path(cfg.root).expanduser()
        manifest = root / "manifest.csv" if root.is_dir() else root
        if not manifest.is_file():
            raise DataError(f"data.root: manifest not found: {manifest}")
    else:
        raise DataError(f"data.format: unknown format {cfg.format!r}; available: synthetic, manifest")
    rows = read_manifest(manifest, wheel)
    if all(split is not None for _, split in rows):
        splits = {name: [s for s, split in rows if split == name] for name in SPLITS}
    else:
        splits = stratified_split([s for s, _ in rows], cfg.split_ratios, seed)
    for name in SPLITS:
        if not splits[name]:
            raise DataError(f"{manifest}: the {name} split is empty")
    return DatasetSplits(wheel, splits)


def load_split_files(folder: Path, wheel: Wheel) -> DatasetSplits:
    """Re-create a run's splits from the manifests it wrote."""
    return DatasetSplits(wheel, {name: [s for s, _ in read_manifest(folder / f"{name}.csv", wheel)]
                                 for name in SPLITS if (folder / f"{name}.csv").is_file()})


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
            with Image.open(sample.path) as im:
                image = self.transform(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"{sample.path}: cannot read image ({e})") from None
        return {"image": image, "label": sample.label, "distribution": self.distributions[index], "index": index}


def make_dataset(samples: Sequence[Sample], wheel: Wheel, transform: Callable, cfg: DataConfig) -> EmotionImages:
    d = cfg.distribution
    if d.source not in ("wheel", "dataset"):
        raise DataError(f"data.distribution.source: {d.source!r} is not one of wheel, dataset")
    return EmotionImages(samples, wheel, transform, d.source, d.sigma, d.epsilon, d.exclusion)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
