"""Crash-safe file writes: a kill at any moment leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class RunError(RuntimeError):
    """A run directory is incomplete, belongs to another setup, or cannot be written."""


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only
    set it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename it over ``path``:
    a kill at any moment leaves either the old file or the new one, never a torn one. The file
    gets the permissions ``open`` would give it (mkstemp's are 0600 whatever the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def writing(what: Path) -> Iterator[None]:
    """Turn a failed write (disk full, quota, permissions) into a message that says what is safe."""
    try:
        yield
    except OSError as e:
        raise RunError(f"cannot write {what}: {e}. Files written earlier are intact (every write is atomic); "
                       "free space or fix permissions, then continue with --resume") from None


def not_a_run(folder: Path, missing: str) -> RunError:
    """The error for a folder that is not a finished run; when it holds runs (e.g. ``runs/demo``,
    a sweep), it names them, since one of those was probably meant."""
    folder = Path(folder)
    # a sweep's runs lie five levels down (runs/dataset/method/variant/seed); deeper is not searched
    runs = sorted(p.parent for depth in range(1, 7) for p in folder.glob("/".join(["*"] * depth) + "/run.json"))
    message = f"{folder} is not a finished run: {missing} is missing"
    if runs:
        shown = ", ".join(str(r) for r in runs[:8]) + (f" and {len(runs) - 8} more" if len(runs) > 8 else "")
        message += f". It holds {len(runs)} run(s); pass one of them: {shown}"
    return RunError(message)
