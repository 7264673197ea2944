"""Named synthetic worlds: documented :class:`~hclafter.data.world.Conditions` presets (SPEC §9).

Each world is one YAML file in ``hclafter/resources/worlds/`` (``configs/worlds/`` links there):
a one-sentence ``description`` of what it changes (for tables), ``why`` its values are what they
are, the cue it ``hurts`` (``global``: colour and scene; ``fine``: the 1-2 pixel textures;
``both``; ``none``) and its ``conditions``. The set was fixed before any result on it was seen, so that results are
published for every world, whatever they show.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Union

import yaml

from .readers import DataError
from .world import Conditions

HURTS = ("none", "global", "fine", "both")
# Hurts both cues by moderate amounts, so that no method is favoured by the choice of world.
DEFAULT_WORLD = "mixed"
_KEYS = ("description", "why", "hurts", "conditions")
_FIELDS = tuple(f.name for f in dataclasses.fields(Conditions))
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE]\d+")


class WorldError(DataError):
    """A world that does not exist or whose file is not a valid world."""


@dataclass(frozen=True)
class World:
    name: str
    description: str  # one sentence: what the world changes
    why: str  # why its values are what they are
    hurts: str  # one of HURTS
    conditions: Conditions
    path: Path


def worlds_dir() -> Path:
    return Path(str(resources.files("hclafter").joinpath("resources", "worlds")))


def available_worlds() -> list[str]:
    return sorted(p.stem for p in worlds_dir().glob("*.yaml"))


def _resolve(name_or_path: Union[str, Path]) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise WorldError(f"world file {path} does not exist")
        return path
    path = worlds_dir() / f"{text}.yaml"
    if not path.is_file():
        raise WorldError(f"unknown world {text!r}; available: {', '.join(available_worlds())} (or a path to a "
                         "world YAML file)")
    return path


def read_world(name_or_path: Union[str, Path]) -> World:
    """A world by name (a shipped one) or from a YAML file, checked key by key."""
    path = _resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise WorldError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise WorldError(f"{path}: a world is a mapping with keys {', '.join(_KEYS)}")
    for key in data:
        if key not in _KEYS:
            raise WorldError(f"{path}: unknown key {key!r}; a world has {', '.join(_KEYS)}")
    for key in _KEYS:
        if key not in data:
            raise WorldError(f"{path}: missing key {key!r}")
    for key in ("description", "why"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise WorldError(f"{path}: {key} must be non-empty text")
    if data["hurts"] not in HURTS:
        raise WorldError(f"{path}: hurts must be one of {', '.join(HURTS)}, got {data['hurts']!r}")
    values = data["conditions"] or {}
    if not isinstance(values, dict):
        raise WorldError(f"{path}: conditions must be a mapping of Conditions fields")
    for key, value in values.items():
        if key not in _FIELDS:
            raise WorldError(f"{path}: unknown key 'conditions.{key}'; Conditions has {', '.join(_FIELDS)}")
        if isinstance(value, str) and _NUMBER.fullmatch(value):  # YAML reads 1.0e6 as text, 1.0e+6 as a number
            raise WorldError(f"{path}: conditions.{key}: {value!r} is text to YAML, which reads an exponent only with "
                             f"its sign; write {value.lower().replace('e', 'e+')}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WorldError(f"{path}: conditions.{key} must be a finite number, got {value!r}")
    try:
        conditions = Conditions(**{k: float(v) for k, v in values.items()})
    except ValueError as e:
        raise WorldError(f"{path}: {e}") from None
    return World(path.stem, " ".join(data["description"].split()), " ".join(data["why"].split()), data["hurts"],
                 conditions, path)


def load_world(name_or_path: Union[str, Path]) -> Conditions:
    """The conditions of a named world (``clean``, ``mixed``, ...) or of a world YAML file."""
    return read_world(name_or_path).conditions
