"""From a dataset root to checked train / val / test splits (official ones where the dataset has
them), with every bad input found, counted and reported."""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.config import DataConfig
from ..core.emotions import POLARITY2, Wheel, get_wheel, load_wheel
from ..core.files import atomic_write_text
from .images import ImageError, ImageTooLarge, load_rgb
from .readers import READERS, SPLITS, DataError, Listing, Problem, Sample, read_manifest, write_manifest
from .synthetic import ensure_synthetic

VERIFY_DRAFT = (256, 256)  # decoding at this size is enough to prove a file is a readable image
SKIPPED_FILE = "skipped.json"  # beside a run's split lists: the inputs it skipped or dropped


@dataclass
class DatasetSplits:
    wheel: Wheel
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    skipped: list[Problem] = field(default_factory=list)  # skipped bad inputs (data.skip_invalid)
    dropped: list[Problem] = field(default_factory=list)  # removed by the dataset's protocol (tied votes)

    def __getitem__(self, split: str) -> list[Sample]:
        return self.splits[split]

    def skipped_summary(self) -> dict:
        items = self.skipped + self.dropped
        return {"count": len(items), "by_kind": dict(Counter(p.kind for p in items)),
                "items": [{"kind": p.kind, "where": p.where, "message": p.message} for p in items]}

    def absent_classes(self) -> dict[str, list[str]]:
        """Per split, the classes without a single image: their F1 is left out of that split's
        macro-F1, and a table should say so."""
        out = {}
        for name, samples in self.splits.items():
            present = {s.label for s in samples}
            missing = [c for i, c in enumerate(self.wheel.classes) if i not in present]
            if missing:
                out[name] = missing
        return out


def stratified_split(samples: Sequence[Sample], ratios: Sequence[float], seed: int) -> dict[str, list[Sample]]:
    """Per-class seeded shuffle, then train/val/test by ``ratios``; every class with at least 3
    images gets a validation and (if asked for) a test image."""
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


def few_shot(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """At most ``shots`` images per class, drawn with a seed (independent of the input order)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.path):
        by_class[s.label].append(s)
    out: list[Sample] = []
    for label in sorted(by_class):
        items = by_class[label]
        out += [items[i] for i in sorted(rng.permutation(len(items))[:shots])]
    return out


def to_polarity(splits: dict[str, list[Sample]], wheel: Wheel) -> dict[str, list[Sample]]:
    """2-class positive/negative labels (and distributions summed by polarity) from finer labels."""
    positive = np.array(wheel.polarity, dtype=bool)

    def convert(s: Sample) -> Sample:
        dist = None
        if s.distribution is not None:
            d = np.asarray(s.distribution)
            dist = (float(d[positive].sum()), float(d[~positive].sum()))
        return Sample(s.path, 0 if wheel.polarity[s.label] else 1, dist)

    return {name: [convert(s) for s in samples] for name, samples in splits.items()}


def resolve_wheel(cfg: DataConfig) -> Wheel:
    if cfg.format != "synthetic" and cfg.format not in READERS:
        raise DataError(f"data.format: unknown format {cfg.format!r}; available: synthetic, {', '.join(READERS)}")
    if cfg.wheel_file is not None:
        return load_wheel(cfg.wheel_file)
    if cfg.label_space is not None:
        return get_wheel(cfg.label_space)
    if cfg.format == "synthetic":
        return get_wheel("mikels8")
    return get_wheel(READERS[cfg.format][1])


def _read(cfg: DataConfig, wheel: Wheel, cache_dir: Path) -> Listing:
    if cfg.splits_dir is not None:
        folder = Path(cfg.splits_dir).expanduser()
        listing = Listing()
        for name in SPLITS:
            if (folder / f"{name}.csv").is_file():
                part = read_manifest(folder / f"{name}.csv", wheel)
                listing.entries += [(s, name) for s, _ in part.entries]
                listing.problems += part.problems
        if not listing.entries:
            raise DataError(f"data.splits_dir: no train/val/test.csv in {folder}")
        return listing
    if cfg.format == "synthetic":
        return read_manifest(ensure_synthetic(cfg, wheel, cache_dir), wheel)
    if cfg.root is None:
        raise DataError(f"data.root: required for data.format={cfg.format}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root: {root} does not exist")
    if cfg.format != "manifest" and not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder (format {cfg.format} reads a dataset folder)")
    return READERS[cfg.format][0](root, wheel, cfg)


def _verify(path: str, max_pixels: int) -> Optional[tuple[str, str]]:
    """None for a readable image, else (kind of problem, message)."""
    try:
        load_rgb(path, draft=VERIFY_DRAFT, max_pixels=max_pixels)
        return None
    except ImageTooLarge as e:
        return "too_large", str(e)
    except ImageError as e:
        return "unreadable_image", str(e)


def _check_files(listing: Listing, wheel: Wheel, verify: bool, max_pixels: int,
                 workers: int = 4) -> list[tuple[Sample, Optional[str]]]:
    """Drop (and record) missing, unreadable, too large and duplicate images; return the good entries.
    An image listed twice with different labels or distributions is dropped altogether: which one is
    right cannot be known."""
    first: dict[str, tuple[Sample, Optional[str]]] = {}
    conflicting: set[str] = set()
    for sample, split in listing.entries:
        if sample.path not in first:
            first[sample.path] = (sample, split)
            continue
        seen, seen_split = first[sample.path]
        where = f" (in {seen_split or 'the unsplit list'} and {split or 'the unsplit list'})" if seen_split or split \
            else ""
        if (seen.label, seen.distribution) != (sample.label, sample.distribution):
            conflicting.add(sample.path)
            listing.problem("conflicting_labels", sample.path,
                            f"listed twice{where} with different labels or distributions ({wheel.classes[seen.label]}, "
                            f"{wheel.classes[sample.label]}): which is right cannot be known, so both are left out")
        else:
            listing.problem("duplicate", sample.path, f"listed twice{where}")
    unique = [(s, split) for s, split in first.values() if s.path not in conflicting]
    present = []
    for sample, split in unique:
        path = Path(sample.path)
        try:
            if path.is_file():
                present.append((sample, split))
            elif path.is_symlink():
                listing.problem("broken_link", sample.path, "symbolic link to a missing file or a link loop")
            else:
                listing.problem("missing_file", sample.path, "image file not found")
        except OSError as e:  # a name over the file system's limit (255 bytes), a path it cannot take
            listing.problem("bad_path", sample.path, f"not a usable path ({e.strerror}); shorten or fix it")
    if not verify:
        return present
    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(pool.map(_verify, [s.path for s, _ in present], [max_pixels] * len(present)))
    good = []
    for (sample, split), error in zip(present, errors):
        if error is None:
            good.append((sample, split))
        else:
            listing.problem(error[0], sample.path, error[1].split(": ", 1)[-1])
    return good


def describe_problems(problems: Sequence[Problem], limit: int = 10) -> str:
    """A count per kind, then the first ``limit`` problems, one per line."""
    counts = Counter(p.kind for p in problems)
    lines = [f"{len(problems)} bad input(s): " + ", ".join(f"{n} {k}" for k, n in counts.most_common())]
    lines += [f"  [{p.kind}] {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (`hclafter data check --limit N` lists more)")
    return "\n".join(lines)


def check_dataset(cfg: DataConfig, seed: int, cache_dir: Path) -> tuple[Optional[DatasetSplits], list[Problem], list[Problem]]:
    """Read and check everything without raising on per-item problems: (splits, problems, dropped)."""
    wheel = resolve_wheel(cfg)
    listing = _read(cfg, wheel, cache_dir)
    good = _check_files(listing, wheel, cfg.verify_images, cfg.max_image_pixels)
    if not good:
        return None, listing.problems, listing.dropped
    if all(split is not None for _, split in good):
        splits = {name: [s for s, split in good if split == name] for name in SPLITS}
        if not splits["val"]:
            # Official splits without validation (e.g. FI as train/test): carve val from train, by class.
            carved = stratified_split(splits["train"], [0.0, cfg.split_ratios[1] / sum(cfg.split_ratios[:2]), 0.0], seed)
            splits["train"], splits["val"] = carved["train"], carved["val"]
    else:
        splits = stratified_split([s for s, _ in good], cfg.split_ratios, seed)
    if cfg.few_shot is not None:
        splits["train"] = few_shot(splits["train"], cfg.few_shot, seed)
    if cfg.polarity:
        splits, wheel = to_polarity(splits, wheel), POLARITY2
    return DatasetSplits(wheel, splits, [], listing.dropped), listing.problems, listing.dropped


def load_splits(cfg: DataConfig, seed: int, cache_dir: Path) -> DatasetSplits:
    """The configured dataset, checked and split (official split where the data has one).

    Bad inputs stop here with a report, unless ``data.skip_invalid`` is set: then they are
    skipped and listed in the run's summary.
    """
    data, problems, _ = check_dataset(cfg, seed, cache_dir)
    if problems and not cfg.skip_invalid:
        raise DataError(describe_problems(problems) + "\nfix them, or set data.skip_invalid=true to skip them "
                                                    "(skips are counted and listed in summary.json)")
    if data is None:
        raise DataError(f"data.root: no usable images found for format {cfg.format}")
    data.skipped = list(problems)
    for name in SPLITS:
        if not data[name]:
            raise DataError(f"the {name} split is empty ({sum(map(len, data.splits.values()))} images in all); "
                            "check data.split_ratios and the dataset's split files")
    return data


def run_wheel(cfg: DataConfig) -> Wheel:
    """The label space a run's labels are in (2-class polarity when ``data.polarity`` is set)."""
    return POLARITY2 if cfg.polarity else resolve_wheel(cfg)


def save_run_splits(folder: Path, data: DatasetSplits) -> None:
    """A run's split lists and its skipped inputs: what :func:`load_run_splits` reads back."""
    for name in SPLITS:
        write_manifest(folder / f"{name}.csv", data[name], data.wheel, name)
    atomic_write_text(folder / SKIPPED_FILE, json.dumps(
        {key: [dataclasses.asdict(p) for p in problems] for key, problems in
         (("skipped", data.skipped), ("dropped", data.dropped))}, indent=2) + "\n")


def load_run_splits(folder: Path, cfg: DataConfig, cache_dir: Path) -> DatasetSplits:
    """The splits a run wrote, exactly: a run trains, resumes and is evaluated on these lists, never on
    a fresh split of ``data.root`` (images added since would leak between train and test)."""
    wheel = run_wheel(cfg)
    if cfg.format == "synthetic":
        ensure_synthetic(cfg, resolve_wheel(cfg), cache_dir)  # regenerated (identically) if the cache was cleared
    absent = [f"{name}.csv" for name in SPLITS if not (folder / f"{name}.csv").is_file()]
    if absent:
        raise DataError(f"{folder}: {absent} missing; the run's split lists are incomplete (restore them from a "
                        "backup, or train the run again)")
    data = load_split_files(folder, wheel)
    if (folder / SKIPPED_FILE).is_file():  # runs from before it was written have none
        try:
            saved = json.loads((folder / SKIPPED_FILE).read_text(encoding="utf-8"))
            data.skipped, data.dropped = ([Problem(**p) for p in saved[key]] for key in ("skipped", "dropped"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{folder / SKIPPED_FILE}: unreadable or corrupt ({e}); restore it from a backup") \
                from None
    gone = [s.path for name in SPLITS for s in data[name] if not os.path.isfile(s.path)]
    if gone:
        raise DataError(f"{len(gone)} image(s) of the run's splits in {folder} are gone, e.g. {gone[0]}; restore "
                        "them: the run continues on exactly the images it started with")
    return data


def load_split_files(folder: Path, wheel: Wheel) -> DatasetSplits:
    """Re-create a run's splits from the manifests it wrote."""
    splits = {}
    for name in SPLITS:
        if (folder / f"{name}.csv").is_file():
            listing = read_manifest(folder / f"{name}.csv", wheel)
            if listing.problems:
                raise DataError(f"{folder / f'{name}.csv'}: the run's split list is damaged ({len(listing.problems)} "
                                f"bad line(s), e.g. {listing.problems[0]}); restore it from a backup")
            splits[name] = [s for s, _ in listing.entries]
    return DatasetSplits(wheel, splits)
