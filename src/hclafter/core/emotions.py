"""Emotion label spaces as data: wheels, distances, polarity and strategy1 distributions.

Classes are always identified by name; a wheel's order is its circular order, which is also
the order of the model's output logits for datasets in that label space.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml


@dataclass(frozen=True)
class Wheel:
    """A circular emotion model: class names in circle order and each class's polarity (1 = positive).

    ``distances`` optionally replaces the circular step count by a full matrix (e.g. the
    reference fork's hand-made matrices).
    """

    name: str
    classes: tuple[str, ...]
    polarity: tuple[int, ...]
    distances: Optional[tuple[tuple[float, ...], ...]] = None

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.polarity):
            raise ValueError(f"wheel {self.name!r}: {len(self.classes)} classes but {len(self.polarity)} polarity values")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"wheel {self.name!r}: class names must be unique, got {list(self.classes)}")
        if any(p not in (0, 1) for p in self.polarity):
            raise ValueError(f"wheel {self.name!r}: polarity values must be 0 (negative) or 1 (positive)")
        if self.distances is not None:
            d = np.asarray(self.distances, dtype=float)
            c = len(self.classes)
            if d.shape != (c, c) or (d < 0).any() or not np.allclose(d, d.T) or np.diag(d).any():
                raise ValueError(f"wheel {self.name!r}: distances must be a symmetric non-negative {c}x{c} "
                                 "matrix with a zero diagonal")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        """The wheel as JSON data (``run.json``, an exported model's config.json)."""
        return {"name": self.name, "classes": list(self.classes), "polarity": list(self.polarity),
                "distances": None if self.distances is None else [list(row) for row in self.distances]}

    @classmethod
    def from_dict(cls, data: dict) -> "Wheel":
        """The wheel :meth:`to_dict` wrote."""
        distances = data.get("distances")
        return cls(data["name"], tuple(data["classes"]), tuple(data["polarity"]),
                   tuple(map(tuple, distances)) if distances else None)

    def index(self, name: str) -> int:
        """Class index by name (case-insensitive), with an error that lists the valid names."""
        key = name.strip().lower()
        key = ALIASES.get(key, key) if key not in self.classes else key
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
POLARITY2 = Wheel("polarity2", ("positive", "negative"), (1, 0))
WHEELS: dict[str, Wheel] = {w.name: w for w in (MIKELS8, EKMAN6, POLARITY2)}
# Spellings used by the datasets' own files (ArtPhoto "sad", Abstract "Content", Twitter "pos"/"neg").
ALIASES = {"sad": "sadness", "content": "contentment", "amused": "amusement", "angry": "anger",
           "disgusted": "disgust", "fearful": "fear", "scared": "fear", "excited": "excitement",
           "happiness": "joy", "happy": "joy", "surprised": "surprise", "pos": "positive", "neg": "negative"}


def get_wheel(name: str) -> Wheel:
    try:
        return WHEELS[name]
    except KeyError:
        raise KeyError(f"unknown label space {name!r}; built in: {sorted(WHEELS)}") from None


def load_wheel(path: str | Path) -> Wheel:
    """A custom wheel from YAML/JSON: ``name``, ``classes`` (circle order), ``polarity`` (1/0 per
    class) and optionally ``distances`` (a full matrix)."""
    path = Path(path).expanduser()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.suffix in (".yaml", ".yml") \
            else json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"data.wheel_file: file not found: {path}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot parse ({e})") from None
    missing = {"name", "classes", "polarity"} - set(raw or {})
    if missing:
        raise ValueError(f"{path}: missing key(s) {sorted(missing)}; expected name, classes, polarity[, distances]")
    distances = raw.get("distances")
    try:
        return Wheel(str(raw["name"]), tuple(str(c).strip().lower() for c in raw["classes"]),
                     tuple(int(p) for p in raw["polarity"]),
                     tuple(tuple(float(x) for x in row) for row in distances) if distances is not None else None)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def wheel_distance(wheel: Wheel, i: int, j: int) -> float:
    """Distance between classes i and j: the wheel's matrix, or the steps around the circle."""
    if wheel.distances is not None:
        return wheel.distances[i][j]
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

