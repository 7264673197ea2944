"""Safetensors checkpoints that carry a content hash and the backbone identity, verified on load,
and a run's resumable training state built from them. Nothing here unpickles."""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .files import RunError, atomic_write_bytes, write_json

FORMAT = "hclafter-checkpoint/1"


class CheckpointError(RunError):
    """A checkpoint that is unreadable, corrupt, or belongs to another backbone."""


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


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer as tensors (per-parameter state) and JSON (hyper-parameters per group)."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": torch.as_tensor(value) for index, entry in state["state"].items()
               for key, value in entry.items()}
    return tensors, state["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random stream: torch (CPU and CUDA) as tensors; Python and NumPy as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    return tensors, {"python": random.getstate(),
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = data["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def save_state(checkpoints: Path, step: int, model: torch.nn.Module, names: Sequence[str],
               optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict, identity: dict) -> None:
    """Write a complete state folder ``checkpoints/step-N``, then point ``latest.json`` at it; older
    folders are removed only after that."""
    folder = checkpoints / f"step-{step:08d}"
    for n in itertools.count(1):  # a second save at the same step must not touch the folder latest.json names
        if not folder.exists():
            break
        folder = checkpoints / f"step-{step:08d}.{n}"
    state = model.state_dict()
    opt_tensors, opt_groups = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()
    hashes = {"weights": save_checkpoint(folder / "weights.safetensors", {n: state[n] for n in names}, identity),
              "optimizer": save_checkpoint(folder / "optimizer.safetensors", {**opt_tensors, **rng_tensors}, identity)}
    write_json(folder / "state.json", {"progress": progress, "optimizer_groups": opt_groups,
                                       "scheduler": scheduler.state_dict(), "rng": rng_json, "sha256": hashes})
    write_json(checkpoints / "latest.json", {"folder": folder.name, "sha256": hashes})
    for old in checkpoints.glob("step-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def load_state(checkpoints: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               identity: dict) -> dict:
    """Restore what :func:`save_state` wrote (weights, optimizer, scheduler, every random stream);
    return the saved progress. CheckpointError when any part is unreadable."""
    try:
        pointer = json.loads((checkpoints / "latest.json").read_text(encoding="utf-8"))
        folder = checkpoints / pointer["folder"]
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        weights = load_checkpoint(folder / "weights.safetensors", identity)
        opt = load_checkpoint(folder / "optimizer.safetensors", identity)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        raise CheckpointError(f"{checkpoints.parent}: cannot resume, the saved state is unreadable ({e})") from None
    model.load_state_dict(weights, strict=False)
    load_optimizer_state(optimizer, {k: v for k, v in opt.items() if not k.startswith("rng.")},
                         state["optimizer_groups"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state({k: v for k, v in opt.items() if k.startswith("rng.")}, state["rng"])
    return state["progress"]


def load_weights(model: torch.nn.Module, path: Path, identity: Optional[dict] = None) -> None:
    """Load a run's weights into ``model``, verifying content hash and backbone identity, and every
    name and shape against the model."""
    saved = load_checkpoint(path, identity)
    own = model.state_dict()
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise CheckpointError(f"{path}: parameters {unknown[:5]} do not exist in the model built from the run's config")
    for name, tensor in saved.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict(saved, strict=False)
