"""Emotion label spaces as data: wheels, distances, polarity and strategy1 distributions.

Classes are always identified by name; a wheel's order is its circular order, which is also
the order of the model's output logits for datasets in that label space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np


@dataclass(frozen=True)
class Wheel:
    """A circular emotion model: class names in circle order and each class's polarity (1 = positive)."""

    name: str
    classes: tuple[str, ...]
    polarity: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.polarity):
            raise ValueError(f"wheel {self.name!r}: {len(self.classes)} classes but {len(self.polarity)} polarity values")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"wheel {self.name!r}: class names must be unique, got {list(self.classes)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Class index by name (case-insensitive), with an error that lists the valid names."""
        key = name.strip().lower()
        for i, c in enumerate(self.classes):
            if c == key:
                return i
        raise KeyError(f"unknown class {name!r} for label space {self.name!r}; expected one of {list(self.classes)}")


MIKELS8 = Wheel(
    "mikels8",
    ("amusement", "contentment", "awe", "excitement", "fear", "sadness", "disgust", "anger"),
    (1, 1, 1, 1, 0, 0, 0, 0),
)
# Surprise counts as positive, as in the usual Ekman-6 sentiment mapping (joy and surprise positive).
EKMAN6 = Wheel(
    "ekman6",
    ("anger", "disgust", "fear", "sadness", "surprise", "joy"),
    (0, 0, 0, 0, 1, 1),
)
WHEELS: dict[str, Wheel] = {w.name: w for w in (MIKELS8, EKMAN6)}


def get_wheel(name: str) -> Wheel:
    try:
        return WHEELS[name]
    except KeyError:
        raise KeyError(f"unknown label space {name!r}; built in: {sorted(WHEELS)}") from None


def wheel_distance(wheel: Wheel, i: int, j: int) -> int:
    """Shortest number of steps between classes i and j around the wheel."""
    step = abs(i - j) % wheel.num_classes
    return min(step, wheel.num_classes - step)


def strategy1(
    wheel: Wheel, label: int, sigma: float = 1.0, epsilon: float = 0.1, exclusion: bool = False
) -> np.ndarray:
    """Label-derived emotion distribution: d_i ∝ N(D(y, i); 0, σ) + ε/C.

    With ``exclusion`` the classes of the opposite polarity get zero mass before normalising.
    """
    if sigma <= 0:
        raise ValueError(f"strategy1 sigma must be > 0, got {sigma}")
    c = wheel.num_classes
    dist = np.array([wheel_distance(wheel, label, i) for i in range(c)], dtype=np.float64)
    d = np.exp(-(dist**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma) + epsilon / c
    if exclusion:
        d *= np.array(wheel.polarity) == wheel.polarity[label]
    return d / d.sum()

