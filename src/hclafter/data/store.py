"""The pre-decoded image store: every image decoded and resized once into a fixed-size uint8
array of a memory-mapped file, so that epochs read pixels instead of decoding JPEGs.

Decoding and resizing a photo costs a CPU core about 30 ms, far more than a GPU spends on the
image; reading its stored pixels costs well under 1 ms. A store holds the output of the model's
own resize and centre crop (``PIL`` steps of the open_clip transform), so evaluation batches are
the JPEG path's tensors exactly; training with ``data.train_augment=crop_flip`` reads a second
store whose squares are larger by ``MARGIN`` and crops them at random. Cropping, flipping and
normalising run as tensor operations on whole batches, on the device the batch is on (see
:class:`InputView`).

A store is one file, ``cache_dir/images/<key>.npy``, keyed like the feature cache by the transform
and the dataset's image paths (all splits, so every seed of a sweep shares them). Each row carries
the size and modification time of the file it was decoded from and a digest of both and the pixels
(:class:`~hclafter.core.integrity.RowFile`): when a run opens the store, a row whose file changed
since, or that fails its digest (a flipped bit, a torn write), is decoded again, the latter with a
warning naming the store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import open_clip
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core.config import MAX_IMAGE_PIXELS, DataConfig
from ..core.integrity import RowFile, rebuild_warning
from .images import ImageError, load_rgb
from .loading import EmotionImages
from .readers import DataError

STORE_VERSION = 2  # part of the key: bump when the stored rows change (2: one file, a digest per row)
MARGIN = 7  # training stores are larger by 1/MARGIN of the side (224 → 256) for random crops


def side(preprocess_cfg: Any) -> tuple[int, int]:
    size = preprocess_cfg.size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_steps(preprocess_cfg: Any, margin: bool = False) -> T.Compose:
    """The model's evaluation transform up to (not including) ToTensor and Normalize: PIL → PIL of
    the model's input size, or larger by 1/MARGIN with ``margin``."""
    if margin:
        size = preprocess_cfg.size
        larger = size + size // MARGIN if isinstance(size, int) else tuple(s + s // MARGIN for s in size)
        preprocess_cfg = dataclasses.replace(preprocess_cfg, size=larger)
    steps = list(open_clip.transform.image_transform_v2(preprocess_cfg, is_train=False).transforms)
    names = [type(t).__name__ for t in steps[-2:]]
    if names not in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
        raise DataError(f"the image store needs a transform ending in ToTensor, Normalize; open_clip gave {names}; "
                        "set data.image_store=off")
    return T.Compose(steps[:-2])


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class _Decode(Dataset):
    """(row, CHW uint8 pixels) of the images to (re)decode."""

    def __init__(self, paths: Sequence[str], rows: Sequence[int], steps: Callable, shape: tuple[int, int, int],
                 max_pixels: int) -> None:
        self.paths, self.rows, self.steps, self.shape, self.max_pixels = list(paths), list(rows), steps, shape, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        try:
            pixels = np.asarray(self.steps(load_rgb(self.paths[index], max_pixels=self.max_pixels))).transpose(2, 0, 1)
        except ImageError as e:
            raise DataError(str(e)) from None
        if pixels.shape != self.shape:
            raise DataError(f"{self.paths[index]}: resized to {pixels.shape}, the image store expects {self.shape}")
        return self.rows[index], np.ascontiguousarray(pixels)


def _stack(items: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([row for row, _ in items]), np.stack([pixels for _, pixels in items])


class ImageStore:
    """uint8 images [N, 3, H, W], one row per path (sorted), memory-mapped from one RowFile whose
    rows also hold the (size, mtime) of the image file each was decoded from."""

    def __init__(self, file: RowFile, paths: Sequence[str]) -> None:
        self.file, self.paths = file, list(paths)
        self.row_of = {p: i for i, p in enumerate(self.paths)}
        self.shape: tuple[int, int, int] = file.field("pixels").shape[1:]

    @property
    def pixels_file(self) -> Path:
        return self.file.path

    @classmethod
    def open(cls, paths: Sequence[str], steps: T.Compose, shape: tuple[int, int, int], cache_dir: Path) -> "ImageStore":
        """The store of these images under these resize steps, created empty (and atomically) on
        first use; rows are decoded by :meth:`update`."""
        paths = sorted(paths)
        key = hashlib.sha256(json.dumps([STORE_VERSION, repr(steps), list(shape), paths]).encode()).hexdigest()[:24]
        # Sparse until rows are written: only the images a run uses take disk space.
        file = RowFile.open(cache_dir / "images" / f"{key}.npy", [("stamp", "<i8", (2,)), ("pixels", "u1", shape)],
                            len(paths), "image-store")
        return cls(file, paths)

    def update(self, paths: Sequence[str], steps: T.Compose, workers: int = 0, progress: bool = True,
               max_pixels: int = MAX_IMAGE_PIXELS) -> int:
        """Decode the rows of ``paths`` never decoded, whose file changed since, or that fail their
        digest (with a warning); returns how many."""
        rows = [self.row_of[path] for path in paths]
        now = {row: _stamp(self.paths[row]) for row in rows}  # before decoding: a change meanwhile is seen next time
        bad, unwritten = self.file.bad_rows(rows)
        if len(bad) > len(unwritten):
            rebuild_warning(self.pixels_file, f"the stored pixels of {len(bad) - len(unwritten)} of {len(rows)} "
                                              "images fail verification (changed on disk)")
        stamps = self.file.field("stamp")
        rows = sorted(set(bad) | {row for row in rows if tuple(stamps[row]) != now[row]})
        if not rows:
            return 0
        need, free = len(rows) * int(np.prod(self.shape)), shutil.disk_usage(self.pixels_file.parent).free
        if need > free:
            raise DataError(f"image store: {len(rows)} images need {need / 1e9:.1f} GB in {self.pixels_file.parent}, "
                            f"{free / 1e9:.1f} GB are free; set cache_dir to a larger disk or data.image_store=off")
        decode = _Decode([self.paths[r] for r in rows], rows, steps, self.shape, max_pixels)
        loader = DataLoader(decode, batch_size=64, num_workers=workers, collate_fn=_stack)
        for batch_rows, batch in tqdm(loader, desc=f"image store ({len(rows)} images)", leave=False,
                                      disable=not progress):
            self.file.write(batch_rows, pixels=batch, stamp=[now[r] for r in batch_rows])
        return len(rows)


class StoredImages(Dataset):
    """The items of an EmotionImages dataset with each image read from an ImageStore: uint8
    [3, H, W] under the same "image" key; labels and distributions are the dataset's own."""

    def __init__(self, images: EmotionImages, store: ImageStore) -> None:
        self.images, self.file = images, store.pixels_file
        self.rows = [store.row_of[s.path] for s in images.samples]
        self._pixels: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:  # loader workers map the file themselves
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        if self._pixels is None:
            self._pixels = np.load(self.file, mmap_mode="r", allow_pickle=False)["pixels"]
        return {"image": torch.from_numpy(np.array(self._pixels[self.rows[index]])),
                "label": self.images.samples[index].label, "distribution": self.images.distributions[index],
                "index": index}


class InputView:
    """Store batches (uint8 [B, 3, h, w]) → the model's input (normalised float [B, 3, H, W]) on
    the batch's device: the centre crop, or in augmented training a random crop and horizontal
    flip per image, then ToTensor's scaling and Normalize's arithmetic (the same operations, so
    the same values). Float batches (JPEG path, cached features) pass unchanged."""

    def __init__(self, preprocess_cfg: Any, augment: bool) -> None:
        self.size, self.augment = side(preprocess_cfg), augment
        self.mean = torch.tensor(preprocess_cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(preprocess_cfg.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        (b, _, h, w), (out_h, out_w), device = images.shape, self.size, images.device
        if train and self.augment:
            # Offsets and flips from the global generator: a resumed run restores it with the state.
            # Slices of contiguous rows copy ten times faster than one gather over index tensors.
            tops = torch.randint(0, h - out_h + 1, (b,)).tolist()
            lefts = torch.randint(0, w - out_w + 1, (b,)).tolist()
            flips = (torch.rand(b) < 0.5).tolist()
            crops = [image[:, top:top + out_h, left:left + out_w]
                     for image, top, left in zip(images, tops, lefts)]
            images = torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips)])
        else:  # torchvision's CenterCrop offsets
            top, left = int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0))
            images = images[:, :, top:top + out_h, left:left + out_w]
        if self.mean.device != device:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        x = images.to(torch.float32, memory_format=torch.contiguous_format)  # one new tensor, then in place
        return x.div_(255).sub_(self.mean).div_(self.std)


def stored_datasets(image_sets: dict[str, EmotionImages], preprocess_cfg: Any, cfg: DataConfig, cache_dir: Path,
                    jpeg_splits: Sequence[str] = (), progress: bool = True) -> tuple[dict[str, Dataset], InputView]:
    """Every split but ``jpeg_splits`` read from the image stores (decoding what is missing or
    changed), and the view that turns their batches into model inputs. The stores span all the
    dataset's images; "train" reads the margin store when ``cfg.train_augment`` is crop_flip."""
    everything = sorted({s.path for ds in image_sets.values() for s in ds.samples})
    h, w = side(preprocess_cfg)
    augment = cfg.train_augment == "crop_flip"
    out: dict[str, Dataset] = dict(image_sets)
    for margin in (False, True):
        splits = [s for s in image_sets if s not in jpeg_splits and (s == "train" and augment) == margin]
        if not splits:
            continue
        steps = resize_steps(preprocess_cfg, margin)
        shape = (3, h + h // MARGIN, w + w // MARGIN) if margin else (3, h, w)
        store = ImageStore.open(everything, steps, shape, cache_dir)
        store.update(sorted({s.path for split in splits for s in image_sets[split].samples}), steps,
                     cfg.num_workers, progress, cfg.max_image_pixels)
        out.update({split: StoredImages(image_sets[split], store) for split in splits})
    return out, InputView(preprocess_cfg, augment)
