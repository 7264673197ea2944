"""Verification of the files hclafter derives and reads back: a sha256 is recorded when a file is
written and checked before it is used, so that a flipped bit, a torn write or a foreign file is
found instead of silently changing a result.

Two forms: :func:`verify_files` checks whole files against the digests another file recorded
(a run's ``checksums.json``, a checkpoint's ``latest.json``); :class:`RowFile` is a memory-mapped
array whose every row carries its own digest (the feature cache, the image store), so that only
the rows a run reads are checked and only the bad ones are rebuilt. Nothing here unpickles.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from .files import RunError

DIGEST = "sha256"  # the digest field of a RowFile record


class IntegrityError(RunError):
    """A file whose content is not what was recorded when it was written."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path, names: Sequence[str]) -> dict[str, str]:
    """The sha256 of each file ``folder/name``."""
    return {name: sha256_file(Path(folder) / name) for name in names}


def verify_files(folder: Path, recorded: Mapping[str, str], record: Path, names: Optional[Sequence[str]] = None) -> None:
    """Each file (of ``names``, default all) that ``record`` lists for ``folder`` must have the sha256
    recorded there; IntegrityError naming the first that does not."""
    for name in recorded if names is None else [n for n in names if n in recorded]:
        path = Path(folder) / name
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise IntegrityError(f"{path}: unreadable ({e.strerror or e}), but {record} lists it; restore it from a "
                                 "backup") from None
        if actual != recorded[name]:
            raise IntegrityError(f"{path}: content differs from the sha256 that {record} recorded when it was "
                                 "written (a damaged or edited file); restore it from a backup, or re-create it")


def rebuild_warning(path: Path, why: str) -> None:
    """The one-line warning of a derived file that failed verification and is rebuilt."""
    warnings.warn(f"{path}: {why}; rebuilding it", stacklevel=3)


class RowFile:
    """A memory-mapped ``.npy`` array of records, one per item, each ending in the sha256 of its
    other fields. A row that was never written, was torn by a kill or changed on disk fails its
    digest (as does one holding non-finite floats) and is rewritten by its owner; a file that is no
    such array at all (truncated, emptied, a pickle, another layout) is replaced by an empty one,
    with a warning."""

    def __init__(self, path: Path, records: np.ndarray) -> None:
        self.path, self.records = path, records
        size = records.dtype.itemsize
        self._body = size - records.dtype[DIGEST].itemsize  # bytes covered by the digest
        self._floats = [name for name in records.dtype.names if records.dtype[name].base.kind == "f"]

    @staticmethod
    def layout(fields: Sequence[tuple[str, str, tuple[int, ...]]]) -> np.dtype:
        return np.dtype([*fields, (DIGEST, "u1", (32,))])

    @classmethod
    def open(cls, path: Path, fields: Sequence[tuple[str, str, tuple[int, ...]]], count: int, what: str) -> "RowFile":
        """The file of ``count`` records with these fields, created empty (sparse, atomically) when
        missing or unusable."""
        path, dtype = Path(path), cls.layout(fields)
        if path.is_file():
            try:  # read-only first: opened for writing, NumPy would silently extend a truncated file
                records = np.load(path, mmap_mode="r", allow_pickle=False)
                if records.dtype == dtype and records.shape == (count,):
                    return cls(path, np.load(path, mmap_mode="r+", allow_pickle=False))
                why = f"a {records.dtype} array of shape {records.shape}, not {count} records of {what}"
            except (ValueError, OSError, EOFError) as e:  # a pickle or object array, truncated, empty, foreign
                why = " ".join(str(e).split()) or type(e).__name__
            rebuild_warning(path, f"{what} file unusable ({why})")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            np.lib.format.open_memmap(tmp, "w+", dtype, (count,)).flush()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path, np.load(path, mmap_mode="r+", allow_pickle=False))

    def field(self, name: str) -> np.ndarray:
        return self.records[name]

    def _digests(self, rows: Sequence[int]) -> np.ndarray:
        raw = self.records.view(np.uint8).reshape(len(self.records), -1)
        return np.array([np.frombuffer(hashlib.sha256(raw[r, :self._body]).digest(), np.uint8) for r in rows],
                        dtype=np.uint8).reshape(len(rows), 32)

    def bad_rows(self, rows: Sequence[int]) -> tuple[list[int], list[int]]:
        """(rows that fail their digest or hold non-finite values, those of them never written)."""
        rows = list(rows)
        if not rows:
            return [], []
        stored = np.asarray(self.records[DIGEST][rows])
        bad = ~(self._digests(rows) == stored).all(axis=1)
        for name in self._floats:
            values = np.asarray(self.records[name][rows]).reshape(len(rows), -1)
            bad |= ~np.isfinite(values).all(axis=1)
        unwritten = ~stored.any(axis=1)
        return [r for r, b in zip(rows, bad) if b], [r for r, b, u in zip(rows, bad, unwritten) if b and u]

    def write(self, rows: Sequence[int], **values: np.ndarray) -> None:
        """Set the fields of ``rows``, then their digests (a kill in between leaves rows that fail)."""
        rows = list(rows)
        for name, value in values.items():
            self.records[name][rows] = value
        self.records[DIGEST][rows] = self._digests(rows)
        self.records.flush()
