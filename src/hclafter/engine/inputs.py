"""What the training loop reads: each split's images through its view, and in their place the
layer-feature cache when the image tower is fixed, or the pre-decoded image store.

Feature cache: when nothing in the image tower trains (no prompts, LayerNorms or backbone
weights) and the view is deterministic, every epoch would re-encode the same images to the same
features. They are stored on disk instead, keyed by backbone identity, extraction layers,
transform and image file identity, and shared by every epoch and every run (of a sweep) with the
same key (whether that holds is the method's answer: ``models.cache_applies``); each image's
features carry a digest, checked whenever a run opens the file. The image store
(``data/store.py``) holds decoded pixels for every other run. A phase that leaves a prompted
tower's features unchanged reads them encoded once, in memory (``encode_split``; the loop's
``TrainState.read_inputs_of``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from ..core.config import Config
from ..core.emotions import Wheel
from ..core.files import RunError
from ..core.integrity import RowFile, rebuild_warning
from ..core.progress import interactive
from ..core.runtime import Runtime, cache_dir_of
from ..data import SPLITS, DataError, DatasetSplits, EmotionImages, load_splits, make_dataset, make_loader
from ..data.store import InputView, StoredImages, stored_datasets
from ..data.views import crop_flip_transform, strong_view
from ..models import LabelledFeatures, StagedClassifier, cache_applies
from ..models.backbone import Backbone, backbone_from_config

FEATURES_VERSION = 2  # part of the key: bump when the file's layout changes (2: a digest per image)


@dataclass
class TrainingInputs:
    images: dict[str, EmotionImages]  # each split's images through its view (decoded from the files)
    datasets: dict[str, Dataset]  # what the loaders read: those images, cached features or image-store rows
    from_features: bool  # the datasets give cached layer features instead of images
    view: Optional[InputView]  # turns image-store batches into model inputs

    def features(self, split: str) -> LabelledFeatures:
        """A split's cached features and labels, whole (what a model's ``fit`` and ``select`` read)."""
        dataset = self.datasets[split]
        rows = torch.from_numpy(np.asarray(dataset.features)[dataset.rows])
        return LabelledFeatures(rows.transpose(0, 1), torch.tensor([s.label for s in dataset.images.samples]))


def image_datasets(cfg: Config, backbone: Backbone, data: DatasetSplits) -> dict[str, EmotionImages]:
    """Every split through its view: the evaluation transform, except for training the strong view
    of pseudo-label training or the random crop and flip of ``data.train_augment=crop_flip``."""
    views = {}
    if cfg.train.supervision == "pseudo":
        views["train"] = strong_view(backbone.preprocess_cfg.size, backbone.preprocess_cfg.mean,
                                     backbone.preprocess_cfg.std)
    if cfg.data.train_augment == "crop_flip":
        views["train"] = crop_flip_transform(backbone.preprocess_cfg)
    return {split: make_dataset(data[split], data.wheel, views.get(split, backbone.preprocess), cfg.data)
            for split in SPLITS}


def training_inputs(cfg: Config, backbone: Backbone, data: DatasetSplits, model: StagedClassifier, runtime: Runtime,
                    cache: Path, show: bool) -> TrainingInputs:
    """The datasets a run's loaders read, building the feature cache or the image store on first use
    (pseudo-labels' strong view stays on the decoded files)."""
    images = image_datasets(cfg, backbone, data)
    if cache_applies(cfg):
        model.to(runtime.device)
        with runtime.main_process_first():
            cached = cached_datasets(model, images, data.wheel, backbone, cache, cfg.data.eval_batch_size,
                                     runtime.device, show and interactive())
        return TrainingInputs(images, cached, True, None)
    if not cfg.data.image_store:
        return TrainingInputs(images, dict(images), False, None)
    jpeg = ("train",) if cfg.train.supervision == "pseudo" else ()
    with runtime.main_process_first():
        stored, view = stored_datasets(images, backbone.preprocess_cfg, cfg.data, cache, jpeg, show)
    return TrainingInputs(images, stored, False, view)


def prepare_stores(cfg: Config, progress: bool = True) -> list[str]:
    """``hclafter data prepare``: decode the stores a training run of ``cfg`` reads, ahead of it;
    returns a line per store (folder, images, size on disk)."""
    if not cfg.data.image_store:
        raise DataError("data.image_store is off: nothing to prepare (set it to true)")
    if cache_applies(cfg):
        return ["the image tower is fixed for this run: it encodes each image once into the feature cache "
                "and reads no image store"]
    cache = cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    jpeg = ("train",) if cfg.train.supervision == "pseudo" else ()
    images = image_datasets(cfg, backbone, load_splits(cfg.data, cfg.seed, cache))
    stored, _ = stored_datasets(images, backbone.preprocess_cfg, cfg.data, cache, jpeg, progress)
    lines = []
    for file in sorted({ds.file for ds in stored.values() if isinstance(ds, StoredImages)}):
        splits = [s for s, ds in stored.items() if isinstance(ds, StoredImages) and ds.file == file]
        used = os.stat(file).st_blocks * 512
        lines.append(f"{file}: {', '.join(splits)} ({sum(len(stored[s]) for s in splits)} images, "
                     f"{used / 1e9:.2f} GB on disk)")
    return lines


def cache_key(identity: dict, layers: Sequence[int], preprocess_cfg, paths: Sequence[str]) -> str:
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    transform = dataclasses.asdict(preprocess_cfg) if dataclasses.is_dataclass(preprocess_cfg) else repr(preprocess_cfg)
    blob = json.dumps([FEATURES_VERSION, identity, list(layers), transform, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.no_grad()
def layer_feature_file(model: torch.nn.Module, images: EmotionImages, key: str, cache_dir: Path, dim: int,
                       batch_size: int, device: torch.device, progress: bool = True) -> np.ndarray:
    """[N, layers, D] features of every image, memory-mapped from ``cache_dir/features/<key>.npy``:
    computed on first use, verified image by image (digest, finite values) on every later one. A file
    that fails is computed again whole, in the batches of the first time (so with the same values),
    after a warning naming it: training on damaged features would change results silently."""
    layers = len(model.extraction_layers)
    file = RowFile.open(cache_dir / "features" / f"{key}.npy", [("features", "<f4", (layers, dim))], len(images),
                        "feature-cache")
    bad, unwritten = file.bad_rows(range(len(images)))
    if not bad:
        return file.field("features")
    if len(bad) > len(unwritten):
        rebuild_warning(file.path, f"the cached features of {len(bad) - len(unwritten)} of {len(images)} images fail "
                                   "verification (changed on disk, or not finite)")
    model.eval()
    start = 0
    for batch in tqdm(make_loader(images, batch_size, False, 0), desc="caching features", leave=False,
                      disable=not progress):
        features = model.forward_features(batch["image"].to(device)).transpose(0, 1).float().cpu().numpy()
        rows = range(start, start + len(features))
        if not np.isfinite(features).all():
            raise RunError(f"the image tower gives non-finite layer features in the batch of "
                           f"{images.samples[rows[0]].path}: check the backbone weights (backbone.pretrained)")
        file.write(rows, features=features)
        start += len(features)
    return file.field("features")


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


class EncodedSplit(Dataset):
    """A split's batches as the loop reads them, each image replaced once by the model's
    ``forward_features`` ([layers, D], under the same "image" key): the dataset of a phase whose
    training leaves those features unchanged (``models.phase_reads_features``), held in memory."""

    def __init__(self, items: dict[str, torch.Tensor]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items["image"])

    def __getitem__(self, index: int) -> dict:
        return {key: value[index] for key, value in self.items.items()}


@torch.no_grad()
def encode_split(model: StagedClassifier, dataset: Dataset, view: Optional[InputView], batch_size: int,
                 runtime: Runtime) -> EncodedSplit:
    """Every item of ``dataset`` in order, its image through ``view`` (image-store rows) and the
    model's current ``forward_features``, in evaluation mode and the run's precision."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(dataset), batch_size):  # batched by hand: a DataLoader would draw from torch's RNG
        batch = default_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        images = batch["image"].to(runtime.device)
        with runtime.autocast():
            batch["image"] = model.forward_features(images if view is None else view(images, train=False))
        batch["image"] = batch["image"].transpose(0, 1).float().cpu()
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    model.train(was_training)
    return EncodedSplit({key: torch.cat(values) for key, values in parts.items()})


def cached_datasets(model: torch.nn.Module, datasets: dict[str, EmotionImages], wheel: Wheel, backbone: Backbone,
                    cache_dir: Path, batch_size: int, device: torch.device,
                    progress: bool = True) -> dict[str, CachedFeatures]:
    """Every split backed by one feature file over all the dataset's images (sorted by path), so
    runs with other splits of the same images (other seeds of a sweep) share it."""
    everything = sorted({s for ds in datasets.values() for s in ds.samples}, key=lambda s: s.path)
    row = {s.path: i for i, s in enumerate(everything)}
    key = cache_key(backbone.identity, model.extraction_layers, backbone.preprocess_cfg, [s.path for s in everything])
    features = layer_feature_file(model, EmotionImages(everything, wheel, backbone.preprocess), key, cache_dir,
                                  backbone.model.visual.output_dim, batch_size, device, progress)
    return {split: CachedFeatures(ds, features, [row[s.path] for s in ds.samples]) for split, ds in datasets.items()}
