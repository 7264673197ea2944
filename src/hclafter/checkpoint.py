"""Crash-safe files: atomic writes, and safetensors checkpoints that carry a content hash and the
backbone identity, verified on load. Nothing here unpickles."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

FORMAT = "hclafter-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable, corrupt, or belongs to another backbone."""


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


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], identity: Optional[dict] = None) -> str:
    """Atomically write ``tensors`` with their content hash and the backbone identity; return the hash."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = content_hash(tensors)
    metadata = {"format": FORMAT, "content_sha256": digest,
                "backbone": json.dumps(identity, sort_keys=True) if identity is not None else ""}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))
    return digest


def load_checkpoint(path: Path, identity: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint, verifying its content hash and (when given) the backbone identity."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); it may be truncated or corrupt") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hclafter checkpoint (format {metadata.get('format')!r})")
    if content_hash(tensors) != metadata.get("content_sha256"):
        raise CheckpointError(f"{path}: content hash mismatch: the file is corrupt (a byte changed on disk)")
    if identity is not None and metadata.get("backbone"):
        saved = json.loads(metadata["backbone"])
        if saved != identity:
            raise CheckpointError(f"{path}: trained with backbone weights {saved.get('weights')} "
                                  f"(quick_gelu={saved.get('quick_gelu')}), but the backbone now is "
                                  f"{identity.get('weights')} (quick_gelu={identity.get('quick_gelu')}); "
                                  "pass the weights file the run was trained with")
    return tensors
