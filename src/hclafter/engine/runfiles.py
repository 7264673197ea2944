"""The files of a run directory: each is written and read here and nowhere else.

A run directory holds ``config.yaml`` (the resolved settings), ``splits/`` (the split lists,
``data/splits.py``), ``metrics.jsonl`` (one record per epoch), ``predictions.csv`` and
``predictions_val.csv`` (one row per image), ``run.json`` (what describes the run: classes,
backbone identity, hardware, timings, and the config and split hashes it was made with),
``summary.json`` (what it computed; written last, it marks the run as finished), and the
weights and resumable state (``core/checkpoint.py``).

``checksums.json``, written just before the summary, records the sha256 of every other file of the
finished run (the summary's included; config.yaml and the split lists are checked against what
run.json records); each reader here checks its file against it, so a damaged file is named instead
of read. Runs finished before it was written are read unchecked.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from ..core.checkpoint import run_fingerprint, saved_fingerprint
from ..core.config import Config, load_config, to_dict
from ..core.emotions import Wheel
from ..core.files import LOCK_FILES, RunError, atomic_write_text, json_text, read_json, read_jsonl, write_json, writing
from ..core.integrity import IntegrityError, file_digests, verify_files
from ..core.stats import RunPredictions
from ..version import __version__
from .evaluation import Predictions

CONFIG, INFO, SUMMARY, LOG = "config.yaml", "run.json", "summary.json", "metrics.jsonl"
PREDICTIONS = {"test": "predictions.csv", "val": "predictions_val.csv"}
CHECKSUMS = "checksums.json"
SEALED_SUFFIXES = (".yaml", ".json", ".jsonl", ".csv", ".safetensors")  # the run's files (not report.html, plots)


class PredictionsFileError(RunError):
    """A predictions file that cannot be read as a run's predictions."""


def is_finished(run_dir: Path) -> bool:
    """Whether the run wrote its summary (the last file of a finished run)."""
    return (Path(run_dir) / SUMMARY).is_file()


# --- checksums.json ----------------------------------------------------------------------------


def _sealed_names(run_dir: Path) -> list[str]:
    """The run's own files in its folder. Not config.yaml and ``splits/``: run.json records them, and
    a change is named key by key (core/checkpoint.py: verify_run_files); nor the state, which
    ``latest.json`` records."""
    return sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.suffix in SEALED_SUFFIXES
                  and p.name not in (CHECKSUMS, CONFIG, *LOCK_FILES))


def verify(run_dir: Path, names: Sequence[str]) -> None:
    """Check these files of a run against its checksums.json (when the run has one): an
    IntegrityError names the first that differs, before anything reads them."""
    run_dir = Path(run_dir)
    record = run_dir / CHECKSUMS
    if not record.is_file():
        return
    digests = read_json(record)
    digests = digests.get("sha256") if isinstance(digests, dict) else None
    unlisted = [n for n in names if not isinstance(digests, dict) or n not in digests]
    if unlisted:
        raise IntegrityError(f"{record} is damaged: it does not list {unlisted[0]}; restore it from a backup")
    verify_files(run_dir, digests, record, names)


def checked(run_dir: Path, name: str) -> Path:
    """``run_dir/name``, after :func:`verify`."""
    verify(run_dir, [name])
    return Path(run_dir) / name


def _unseal(run_dir: Path) -> None:
    """Before a file of the run changes (a resume finishes it again): its checksums no longer hold,
    until the summary writes new ones."""
    (Path(run_dir) / CHECKSUMS).unlink(missing_ok=True)


# --- config.yaml -------------------------------------------------------------------------------


def write_config(run_dir: Path, cfg: Config) -> None:
    _unseal(run_dir)
    atomic_write_text(Path(run_dir) / CONFIG, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def read_config(run_dir: Path) -> Config:
    return load_config([Path(run_dir) / CONFIG])


def saved_run_config(run_dir: Path) -> dict:
    """The settings a run was made with: those its last checkpoint or its run.json stores, else
    its config.yaml."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "latest.json").is_file():
        return saved_fingerprint(run_dir / "checkpoints")["config"]
    if (run_dir / INFO).is_file():
        info = read_info(run_dir)
        if isinstance(info, dict) and "config" in info:
            return info["config"]
    return to_dict(read_config(run_dir))


# --- run.json and summary.json -----------------------------------------------------------------


def write_info(run_dir: Path, cfg: Config, wheel: Wheel, identity: dict, started: float, **extra: Any) -> None:
    """``run.json``: what describes the run, timings included (latency, wall time), which vary
    between machines, and the config and split lists it was made with (checked on loading).
    ``summary.json`` holds what the run computed (reproducible to the bit on one CPU)."""
    run_dir = Path(run_dir)
    record = run_fingerprint(to_dict(cfg), run_dir / "splits")
    _unseal(run_dir)
    with writing(run_dir, run_dir):
        write_json(run_dir / INFO, {"classes": list(wheel.classes), "label_space": wheel.name,
                                    "wheel": wheel.to_dict(), "backbone": identity,
                                    "mode": cfg.mode, "method": cfg.model.method, **extra,
                                    "hclafter_version": __version__, "torch_version": torch.__version__,
                                    "wall_time_s": time.time() - started, "config": record["config"],
                                    "splits_sha256": record["splits"]})


def read_info(run_dir: Path) -> dict:
    return read_json(checked(run_dir, INFO))


def info_wheel(info: dict) -> Wheel:
    """The run's label space as its run.json records it."""
    return Wheel.from_dict(info["wheel"])


def write_summary(run_dir: Path, summary: dict) -> None:
    """``summary.json``, last of a run's files: it marks the run as finished (a kill before it leaves
    a run that ``--resume`` finishes). Just before it, ``checksums.json``: the sha256 of every file of
    the run, the summary's included."""
    run_dir = Path(run_dir)
    text = json_text(summary)
    with writing(run_dir, run_dir):
        digests = file_digests(run_dir, [n for n in _sealed_names(run_dir) if n != SUMMARY])
        write_json(run_dir / CHECKSUMS, {"sha256": {**digests, SUMMARY: hashlib.sha256(text.encode()).hexdigest()}})
        atomic_write_text(run_dir / SUMMARY, text)


def read_summary(run_dir: Path) -> dict:
    return read_json(checked(run_dir, SUMMARY))


def tested(run_dir: Path, summary: dict) -> dict:
    """``summary`` if its run predicted test; a tuning trial's (scored on validation only) is refused by name."""
    if "test" not in summary:
        raise RunError(f"{run_dir} is a tuning trial, scored on validation only: its test split was never predicted; "
                       f"evaluate it with hclafter eval {run_dir}, or use the study's best/seedK runs")
    return summary


# --- metrics.jsonl -----------------------------------------------------------------------------


def append_record(run_dir: Path, record: dict) -> None:
    """One epoch's line of ``metrics.jsonl``."""
    path = Path(run_dir) / LOG
    _unseal(run_dir)
    with writing(path, run_dir), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_records(run_dir: Path, records: Sequence[dict]) -> None:
    """``metrics.jsonl`` whole, from the saved records (so a torn last line of a killed run is repaired)."""
    path = Path(run_dir) / LOG
    _unseal(run_dir)
    with writing(path, run_dir):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_records(run_dir: Path) -> list[dict]:
    """The epochs' records; none for a run without training (a frozen baseline)."""
    path = Path(run_dir) / LOG
    return read_jsonl(checked(run_dir, LOG)) if path.is_file() else []


# --- predictions.csv, predictions_val.csv -------------------------------------------------------


def write_predictions(run_dir: Path, split: str, preds: Predictions, samples: Sequence, wheel: Wheel) -> None:
    """One row per image, so that every metric can be recomputed from the file: ``path, label,
    prediction``, the fused probabilities ``p_<class>``, the target distribution ``t_<class>``, each
    stage's probabilities ``s<k>_<class>`` (k = 1..S) and the fused logits ``z_<class>`` (unrounded:
    temperature scaling is fitted on them)."""
    probs = preds.probabilities
    stages = [] if preds.stage_probabilities is None else list(preds.stage_probabilities)
    classes = wheel.classes
    header = ["path", "label", "prediction", *[f"p_{c}" for c in classes], *[f"t_{c}" for c in classes],
              *[f"s{k}_{c}" for k in range(1, len(stages) + 1) for c in classes], *[f"z_{c}" for c in classes]]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for i, idx in enumerate(preds.indices):
        writer.writerow([samples[idx].path, classes[preds.labels[i]], classes[probs[i].argmax()],
                         *[f"{p:.6f}" for p in probs[i]], *[f"{t:.6f}" for t in preds.distributions[i]],
                         *[f"{p:.6f}" for stage in stages for p in stage[i]],
                         *[format(float(z), ".9g") for z in preds.logits[i]]])
    _unseal(run_dir)
    atomic_write_text(Path(run_dir) / PREDICTIONS[split], text.getvalue())


def read_predictions(run_dir: Path, split: str = "test", classes: Optional[Sequence[str]] = None) -> RunPredictions:
    """A run's predictions of ``split`` (:func:`write_predictions`). Classes are matched by name:
    with ``classes`` the columns are put in that order (the file must hold exactly those classes),
    else in the file's order."""
    path = Path(run_dir) / PREDICTIONS[split]
    try:
        with open(checked(run_dir, PREDICTIONS[split]), newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise PredictionsFileError(f"{path} is missing; the run directory is incomplete") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PredictionsFileError(f"{path} is unreadable ({e}); restore it from a backup") from None
    header = rows[0] if rows else []
    file_classes = [c[2:] for c in header if c.startswith("p_")]
    if header[:3] != ["path", "label", "prediction"] or not file_classes:
        raise PredictionsFileError(f"{path}: the header must be path,label,prediction,p_<class>...; "
                                   f"got {header if rows else 'an empty file'}")
    order = tuple(classes) if classes is not None else tuple(file_classes)
    if sorted(order) != sorted(file_classes) or len(set(order)) != len(order):
        raise PredictionsFileError(f"{path}: holds classes {file_classes}, expected {list(order)}")
    index = {c: i for i, c in enumerate(order)}
    prefixes = ["p_", "z_", "t_"] + [f"s{k}_" for k in range(1, len(header)) if f"s{k}_{order[0]}" in header]
    blocks = {prefix: [header.index(f"{prefix}{c}") for c in order] for prefix in prefixes
              if all(f"{prefix}{c}" in header for c in order)}
    paths, labels, predicted = [], [], []
    values: dict[str, list] = {prefix: [] for prefix in blocks}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise PredictionsFileError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        unknown = [v for v in row[1:3] if v not in index]
        if unknown:
            raise PredictionsFileError(f"{path}:{line}: unknown class {unknown[0]!r} (classes: {list(order)})")
        try:
            for prefix, columns in blocks.items():
                values[prefix].append([float(row[c]) for c in columns])
        except ValueError as e:
            raise PredictionsFileError(f"{path}:{line}: {e}") from None
        paths.append(row[0])
        labels.append(index[row[1]])
        predicted.append(index[row[2]])
    if not paths:
        raise PredictionsFileError(f"{path}: no predictions")
    arrays = {prefix: np.array(v).reshape(len(paths), -1) for prefix, v in values.items()}
    stages = [arrays[p] for p in prefixes[3:] if p in arrays]
    return RunPredictions(tuple(paths), np.array(labels), np.array(predicted), arrays["p_"], order,
                          arrays.get("z_"), arrays.get("t_"), np.stack(stages) if stages else None)
