"""Training views of an image beside the evaluation transform: LaFTer's strong augmentation for
the student of pseudo-label training, and the random crop and flip of ``data.train_augment``."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torchvision.transforms as T

from .store import resize_steps, side


def strong_view(size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Callable:
    """LaFTer's strong augmentation for the student in pseudo-label training (SimSiam/MoCo-v2 style)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.GaussianBlur(kernel_size=max(3, (min(size if isinstance(size, int) else size) // 10) | 1), sigma=(0.1, 2.0)),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def crop_flip_transform(preprocess_cfg: Any) -> Callable:
    """The JPEG path's counterpart of the store's training view: the margin resize, a random crop
    of the input size and a random horizontal flip (``data.train_augment=crop_flip``)."""
    return T.Compose([*resize_steps(preprocess_cfg, margin=True).transforms, T.RandomCrop(side(preprocess_cfg)),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(preprocess_cfg.mean, preprocess_cfg.std)])
