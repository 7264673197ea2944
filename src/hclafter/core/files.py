"""Crash-safe file writes: a kill at any moment leaves the old file or the new one, never a torn one.
Run-directory locks: one process at a time writes a run."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from filelock import FileLock, Timeout


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # name the file meant, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A new folder beside ``target`` (on its file system, so that :func:`replace_dir` can rename it
    there), with the permissions ``mkdir`` would give it; removed at the end unless renamed. Folders
    staged for ``target`` by processes that have died are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = stale.name[len(target.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(staged, 0o777 & ~_umask())
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def replace_dir(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``: a kill leaves at ``target`` the old folder, the new one, or
    for an instant neither (the old one then lies beside it, hidden, until the next staging)."""
    staged, target = Path(staged), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old.tmp")
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(data: Any) -> str:
    """How hclafter writes JSON files."""
    return json.dumps(data, indent=2) + "\n"


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json_text(data))


@contextmanager
def writing(what: Path, run: Optional[Path] = None) -> Iterator[None]:
    """Turn a failed write (disk full, quota, permissions) into a message that says what is safe and
    what to run next: ``--resume`` only where the run being written (``run``) has a saved state."""
    try:
        yield
    except OSError as e:
        then = ("continue with --resume" if run is not None and (Path(run) / "checkpoints" / "latest.json").is_file()
                else "run the command again")
        raise RunError(f"cannot write {what}: {e}. Files written earlier are intact (every write is atomic); "
                       f"free space or fix permissions, then {then}") from None


def read_json(path: Path) -> Any:
    """A JSON file of a run, or a RunError that names it and says it is damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing; the run directory is incomplete") from None
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunError(f"{path} is unreadable or corrupt ({e}); restore it from a backup, or re-create the "
                       "run (train it again into another --out)") from None


def read_jsonl(path: Path) -> list:
    """A JSON-lines log of a run (metrics.jsonl), or a RunError naming the line that is damaged."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}); restore it from a backup") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise RunError(f"{path}:{number} is not valid JSON ({e}), e.g. torn by a crash; `hclafter train "
                               "--out RUN --resume` rewrites the log from the run's saved state, or delete the "
                               "line") from None
    return records


# The lock file and the note saying who holds it; both stay out of a cleared run directory.
LOCK_FILE, HOLDER_FILE = ".hclafter.lock", ".hclafter.lock.json"
LOCK_FILES = (LOCK_FILE, HOLDER_FILE)
_held: dict[str, int] = {}  # folders this process holds → nesting depth


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(folder: Path, wait: float = 1.0) -> str:
    """Who holds the folder's lock, from its note. A holder that has just taken the lock may not
    have written it yet (and the note of a dead holder may still be there): wait briefly for it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            note = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
            live = note["host"] != socket.gethostname() or _alive(int(note["pid"]))
            if live:
                return f"PID {note['pid']} on {note['host']} (since {note['since']}: {note['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            return "another process (it has not said which yet)"
        time.sleep(0.05)


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of a run directory (created if needed) while the block runs; a second
    process fails at once with a RunError naming the holder's PID. The operating system drops the
    lock when its holder dies (flock), so the lock of a killed run is taken over, never waited
    for. Re-entrant within a process (a sweep holds a run's lock around ``train_run``)."""
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"{folder} is in use by {_holder(folder)}: two runs must not write one directory; wait "
                       "for it to finish, or choose another --out") from None
    _held[key] = 1
    try:
        with writing(folder):
            write_json(folder / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                              "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                              "command": " ".join(sys.argv)[:300]})
        yield
    finally:
        del _held[key]
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def clear_run_dir(folder: Path) -> None:
    """Remove everything in a run directory except its lock (whose holder is the caller)."""
    for entry in Path(folder).iterdir():
        if entry.name in LOCK_FILES:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


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
