"""Readers for the field's datasets in their published layouts.

Every reader returns the entries it found and the problems it met (missing files, unknown
class names, malformed lines, ...) instead of stopping at the first one, so ``data check`` can
report them all and training can either refuse or skip them, never drop them silently.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..core.config import DataConfig
from ..core.emotions import Wheel
from ..core.files import atomic_write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad dataset input, reported with the file and line."""


@dataclass(frozen=True)
class Sample:
    path: str  # absolute image path
    label: int
    distribution: Optional[tuple[float, ...]] = None  # per-image votes, in the wheel's class order


@dataclass(frozen=True)
class Problem:
    kind: str  # missing_file, unreadable_image, unknown_class, malformed_line, bad_distribution, duplicate, ...
    where: str  # file[:line] or image path
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Listing:
    entries: list[tuple[Sample, Optional[str]]] = field(default_factory=list)  # (sample, official split or None)
    problems: list[Problem] = field(default_factory=list)
    dropped: list[Problem] = field(default_factory=list)  # removed by the dataset's protocol (e.g. tied votes)

    def add(self, path: Path, label: int, distribution=None, split: Optional[str] = None) -> None:
        dist = None if distribution is None else tuple(float(p) for p in distribution)
        self.entries.append((Sample(str(path.resolve()), label, dist), split))

    def problem(self, kind: str, where: object, message: str) -> None:
        self.problems.append(Problem(kind, str(where), message))


def _class_index(wheel: Wheel, name: str) -> Optional[int]:
    try:
        return wheel.index(name)
    except KeyError:
        return None


def normalise_votes(values: np.ndarray) -> Optional[np.ndarray]:
    """Votes or probabilities → a distribution; None when they are unusable (negative, all zero)."""
    if values.ndim != 1 or not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        return None
    return values / values.sum()


def _label_from_votes(listing: Listing, dist: np.ndarray, where: str, ties: str) -> Optional[int]:
    winners = np.flatnonzero(dist == dist.max())
    if len(winners) > 1 and ties == "skip":
        listing.dropped.append(Problem("tied_votes", where, "no single most-voted emotion (data.ties=skip)"))
        return None
    return int(winners[0])


# --- folder layouts -------------------------------------------------------------------------

def _scan_class_folders(root: Path, wheel: Wheel, listing: Listing, split: Optional[str]) -> None:
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = _class_index(wheel, folder.name)
        if label is None:
            listing.problem("unknown_class", folder, f"folder name is not a class of {wheel.name} "
                                                     f"({list(wheel.classes)})")
            continue
        for path in sorted(folder.rglob("*")):
            if path.name.startswith("."):
                continue
            if path.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    listing.add(path, label, split=split)
                else:
                    listing.problem("not_an_image", path, f"unexpected file type {path.suffix!r} in a class folder")
            else:
                _broken_link(listing, path)


def _broken_link(listing: Listing, path: Path) -> None:
    """Record a symbolic link named like an image that leads nowhere (a missing target or a loop);
    such a link would otherwise vanish from the dataset uncounted."""
    if path.is_symlink() and not path.exists() and path.suffix.lower() in IMAGE_SUFFIXES:
        listing.problem("broken_link", path, f"symbolic link to a missing file or a link loop (-> {os.readlink(path)})")


def read_imagefolder(root: Path, wheel: Wheel, cfg: DataConfig) -> Listing:
    """``<class>/*.jpg``, or ``{train,val,test}/<class>/*.jpg`` with the split taken from the folders
    (FI, Twitter I/II and any ImageFolder-style dataset)."""
    listing = Listing()
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise DataError(f"{root}: has {[p.name for p in split_dirs]} but a split layout needs train/ and test/ "
                            "(val/ optional); or use a flat <class>/ layout")
        for d in split_dirs:
            _scan_class_folders(d, wheel, listing, d.name)
    else:
        _scan_class_folders(root, wheel, listing, None)
    return listing


def read_artphoto(root: Path, wheel: Wheel, cfg: DataConfig) -> Listing:
    """ArtPhoto: one folder of ``<emotion>_<n>.jpg`` files (class from the file-name prefix)."""
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return read_imagefolder(root, wheel, cfg)
    listing = Listing()
    for path in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            _broken_link(listing, path)
            continue  # ArtPhoto ships no other files; stray notes or archives are not samples
        prefix = re.split(r"[_\-\d]", path.stem, maxsplit=1)[0]
        label = _class_index(wheel, prefix)
        if label is None:
            listing.problem("unknown_class", path, f"file-name prefix {prefix!r} is not a class of {wheel.name}")
        else:
            listing.add(path, label)
    return listing


# --- annotation files -----------------------------------------------------------------------

def read_emoset(root: Path, wheel: Wheel, cfg: DataConfig) -> Listing:
    """EmoSet-118K: ``{train,val,test}.json`` lists of ``[emotion, id, image_path, annotation_path]``,
    label names checked against ``info.json`` (its index order is ignored: classes map by name)."""
    listing = Listing()
    info = root / "info.json"
    if info.is_file():
        names = json.loads(info.read_text(encoding="utf-8")).get("emotion", {}).get("label2idx", {})
        unknown = sorted(n for n in names if _class_index(wheel, n) is None)
        if unknown:
            raise DataError(f"{info}: emotions {unknown} are not classes of {wheel.name}; set data.label_space")
    for split in SPLITS:
        path = root / f"{split}.json"
        if not path.is_file():
            if split == "val":
                continue
            raise DataError(f"{path}: missing; EmoSet needs train.json and test.json (and val.json) in data.root")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(entries, list):
            raise DataError(f"{path}: expected a list of [emotion, id, image_path, annotation_path] entries")
        for i, entry in enumerate(entries):
            where = f"{path}:entry {i}"
            if not (isinstance(entry, (list, tuple)) and len(entry) >= 3 and all(isinstance(x, str) for x in entry[:3])):
                listing.problem("malformed_line", where, f"expected [emotion, id, image_path, ...], got {entry!r:.80}")
                continue
            label = _class_index(wheel, entry[0])
            if label is None:
                listing.problem("unknown_class", where, f"unknown emotion {entry[0]!r}")
                continue
            listing.add(root / entry[2], label, split=split)
    return listing


def read_emotion6(root: Path, wheel: Wheel, cfg: DataConfig) -> Listing:
    """Emotion6: ``images/<keyword>/<n>.jpg`` and tab-separated ``ground_truth.txt`` (header line;
    file, valence, arousal, then anger, disgust, fear, joy, sadness, surprise, neutral). Neutral is
    dropped and the six emotions renormalised; the label is the keyword folder or the arg-max."""
    table = root / "ground_truth.txt"
    if not table.is_file():
        raise DataError(f"{table}: missing; Emotion6 needs ground_truth.txt beside images/")
    order = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
    columns = [_class_index(wheel, name) for name in order]
    if None in columns:
        raise DataError(f"data.label_space {wheel.name!r} lacks Emotion6's classes {order}; use ekman6")
    listing = Listing()
    images = root / "images" if (root / "images").is_dir() else root
    lines = table.read_text(encoding="utf-8-sig").splitlines()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{table}:{number}"
        fields = line.split("\t") if "\t" in line else line.split()
        try:
            if len(fields) != 10:
                raise ValueError(f"expected 10 fields (file, valence, arousal, 7 probabilities), got {len(fields)}")
            probs = np.array([float(x) for x in fields[3:9]])
        except ValueError as e:
            listing.problem("malformed_line", where, str(e))
            continue
        six = normalise_votes(probs)
        if six is None:
            listing.problem("bad_distribution", where, "no votes for any of the six emotions (only neutral)")
            continue
        dist = np.zeros(wheel.num_classes)
        dist[columns] = six
        if cfg.emotion6_label == "folder":
            keyword = Path(fields[0]).parts[0] if len(Path(fields[0]).parts) > 1 else ""
            label = _class_index(wheel, keyword)
            if label is None:
                listing.problem("unknown_class", where, f"image {fields[0]!r} is not in a keyword folder naming a class")
                continue
        else:
            label = _label_from_votes(listing, dist, where, cfg.ties)
            if label is None:
                continue
        listing.add(images / fields[0], label, dist)
    return listing


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and rows of a comma/tab/semicolon/whitespace separated file, with line numbers."""
    text = path.read_text(encoding="utf-8-sig")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty file")
    sample = lines[0][1]
    delimiter = next((d for d in ("\t", ",", ";") if d in sample), None)

    def split(line: str) -> list[str]:
        cells = next(csv.reader([line], delimiter=delimiter, quotechar="'" if "'" in sample else '"')) \
            if delimiter else line.split()
        return [c.strip().strip("'\"") for c in cells]

    return split(lines[0][1]), [(n, split(line)) for n, line in lines[1:]]


def read_vote_table(table: Path, image_dirs: list[Path], wheel: Wheel, cfg: DataConfig) -> Listing:
    """Per-image vote counts or probabilities in columns named by emotion (any order, matched by
    name), first column the image file: Abstract, FlickrLDL, TwitterLDL."""
    header, rows = _read_table(table)
    columns = {i: _class_index(wheel, name) for i, name in enumerate(header) if i > 0}
    matched = {c: i for i, c in columns.items() if c is not None}
    if len(matched) != wheel.num_classes:
        missing = [wheel.classes[c] for c in range(wheel.num_classes) if c not in matched]
        raise DataError(f"{table}:1: header {header} lacks columns for {missing}; the first line must name the "
                        "image column and one column per emotion (sources disagree on the column order)")
    listing = Listing()
    for number, cells in rows:
        where = f"{table}:{number}"
        try:
            votes = np.array([float(cells[matched[c]]) for c in range(wheel.num_classes)])
        except (ValueError, IndexError):
            listing.problem("malformed_line", where, f"expected {len(header)} fields with numeric votes, got {cells}")
            continue
        dist = normalise_votes(votes)
        if dist is None:
            listing.problem("bad_distribution", where, f"votes {votes.tolist()} are negative or all zero")
            continue
        label = _label_from_votes(listing, dist, where, cfg.ties)
        if label is None:
            continue
        name = cells[0]
        path = next((d / name for d in image_dirs if (d / name).is_file()), image_dirs[0] / name)
        listing.add(path, label, dist)
    return listing


def _find_table(root: Path, patterns: tuple[str, ...], what: str) -> Path:
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    raise DataError(f"{root}: no {what} found (looked for {', '.join(patterns)})")


def read_abstract(root: Path, wheel: Wheel, cfg: DataConfig) -> Listing:
    table = _find_table(root, ("ABSTRACT_groundTruth.csv", "*groundTruth*.csv", "*ground_truth*.csv"),
                        "ground-truth vote table")
    return read_vote_table(table, [root / "images", root], wheel, cfg)


def read_ldl(root: Path, wheel: Wheel, cfg: DataConfig) -> Listing:
    table = _find_table(root, ("ground_truth.txt", "*ground_truth*.*", "*.csv"), "ground-truth vote table")
    return read_vote_table(table, [root / "images", root], wheel, cfg)


def read_manifest(path: Path, wheel: Wheel, cfg: Optional[DataConfig] = None) -> Listing:
    """CSV (``path,label[,split][,distribution]``) or JSON lines with the same keys. Paths relative
    to the manifest; labels are class names; a distribution is a list, a ``{class: p}`` object or
    space-separated probabilities in the label space's order."""
    if path.is_dir():
        path = next((path / n for n in ("manifest.csv", "manifest.jsonl") if (path / n).is_file()), path / "manifest.csv")
    if not path.is_file():
        raise DataError(f"data.root: manifest not found: {path}")
    try:
        return _read_manifest_rows(path, wheel)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV/JSON-lines manifest ({e}); the file may be corrupt") from None


def _read_manifest_rows(path: Path, wheel: Wheel) -> Listing:
    listing = Listing()
    base = path.parent
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                listing.problem("malformed_line", f"{path}:{number}", f"not a JSON object ({e})")
                continue
            rows.append((number, row))
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"path", "label"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}:1: header lacks column(s) {sorted(missing)}; expected "
                                "path,label[,split][,distribution]")
            rows = list(enumerate(reader, start=2))
    for number, row in rows:
        where = f"{path}:{number}"
        if not row.get("path") or not row.get("label"):
            listing.problem("malformed_line", where, "needs a path and a label")
            continue
        label = _class_index(wheel, str(row["label"]))
        if label is None:
            listing.problem("unknown_class", where, f"unknown class {row['label']!r} for label space {wheel.name} "
                                                    f"({list(wheel.classes)})")
            continue
        dist = None
        raw = row.get("distribution")
        if raw not in (None, ""):
            dist = _parse_distribution(raw, wheel)
            if dist is None:
                listing.problem("bad_distribution", where, f"distribution must be {wheel.num_classes} non-negative "
                                                           f"probabilities summing to 1, got {raw!r}")
                continue
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            listing.problem("malformed_line", where, f"split {split!r} is not one of {SPLITS}")
            continue
        listing.add(base / str(row["path"]), label, dist, split)
    return listing


def _parse_distribution(raw, wheel: Wheel) -> Optional[np.ndarray]:
    try:
        if isinstance(raw, dict):
            values = np.zeros(wheel.num_classes)
            for name, p in raw.items():
                index = _class_index(wheel, name)
                if index is None:
                    return None
                values[index] = float(p)
        elif isinstance(raw, list):
            values = np.array([float(v) for v in raw])
        else:
            values = np.array([float(v) for v in str(raw).split()])
    except (TypeError, ValueError):
        return None
    if values.shape != (wheel.num_classes,) or abs(values.sum() - 1) > 1e-3:
        return None
    return normalise_votes(values)


Reader = Callable[[Path, Wheel, DataConfig], Listing]
# format → (reader, native label space)
READERS: dict[str, tuple[Reader, str]] = {
    "imagefolder": (read_imagefolder, "mikels8"),
    "fi": (read_imagefolder, "mikels8"),
    "twitter1": (read_imagefolder, "polarity2"),
    "twitter2": (read_imagefolder, "polarity2"),
    "artphoto": (read_artphoto, "mikels8"),
    "emoset": (read_emoset, "mikels8"),
    "emotion6": (read_emotion6, "ekman6"),
    "abstract": (read_abstract, "mikels8"),
    "flickrldl": (read_ldl, "mikels8"),
    "twitterldl": (read_ldl, "mikels8"),
    "manifest": (read_manifest, "mikels8"),
}


def write_manifest(path: Path, samples: Sequence[Sample], wheel: Wheel, split: Optional[str] = None) -> None:
    """A CSV manifest (path, label, split, distribution) that :func:`read_manifest` reads back,
    written atomically (a run's split lists are what a resume continues with)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "label", "split", "distribution"])
    for s in samples:
        dist = " ".join(f"{p:.6g}" for p in s.distribution) if s.distribution is not None else ""
        writer.writerow([s.path, wheel.classes[s.label], split or "", dist])
    atomic_write_text(path, text.getvalue())
