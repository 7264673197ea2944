"""Safetensors checkpoints that carry a content hash and the backbone identity, verified on load,
and a run's resumable training state built from them: ``checkpoints/latest.json`` names the newest
complete state and records the sha256 of every file a resume reads. Nothing here unpickles."""
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

from .config import RUN_NEUTRAL
from .files import RunError, atomic_write_bytes, read_json, write_json
from .integrity import file_digests, sha256_file, verify_files

FORMAT = "hclafter-checkpoint/1"


class CheckpointError(RunError):
    """A checkpoint that is unreadable, corrupt, or belongs to another backbone."""


STATE_KEYS = ("progress", "optimizer_groups", "scheduler", "rng", "fingerprint")  # what state.json holds


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], identity: Optional[dict] = None,
                    extra: Optional[dict[str, str]] = None) -> str:
    """Atomically write ``tensors`` with their content hash, the backbone identity and ``extra``
    metadata (checked by :func:`load_checkpoint`'s ``expect``); return the hash."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = content_hash(tensors)
    metadata = {**(extra or {}), "format": FORMAT, "content_sha256": digest,
                "backbone": json.dumps(identity, sort_keys=True) if identity is not None else ""}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))
    return digest


def load_checkpoint(path: Path, identity: Optional[dict] = None,
                    expect: Optional[dict[str, tuple[str, Path]]] = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint, verifying its content hash, (when given) the backbone identity, and each
    ``expect`` key: its metadata value must be the digest of the file that comes with it."""
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
    for key, (value, other) in (expect or {}).items():
        if metadata.get(key) != value:
            raise CheckpointError(f"{other} is not the file {path} was written with ({key} differs): one of them "
                                  "is damaged, or they come from different exports")
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


def run_fingerprint(config: dict, splits: Path) -> dict:
    """What a run's state is only valid with: its resolved config (kept whole, so that a change
    can be named) and the sha256 of every file of its ``splits/`` folder."""
    return {"config": config, "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "splits": {p.name: sha256_file(p) for p in sorted(Path(splits).glob("*")) if p.is_file()}}


def _read_object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def saved_state(checkpoints: Path) -> tuple[Path, dict]:
    """The folder of the latest state and its ``state.json``, after checking every file the state
    lists (its own, and the run's files it was saved with) against the sha256 ``latest.json``
    recorded; CheckpointError naming the file that is damaged."""
    latest = checkpoints / "latest.json"
    try:
        pointer = _read_object(latest)
        if not isinstance(pointer.get("folder"), str) or not isinstance(pointer.get("files", {}), dict):
            raise CheckpointError(f"{latest} does not name a state folder and its files")
        if "files" in pointer:
            verify_files(checkpoints.parent, pointer["files"], latest)
        elif "sha256" not in pointer:  # states saved before the files were recorded have "sha256" instead
            raise CheckpointError(f"{latest} does not record the sha256 of the state's files")
        folder = checkpoints / pointer["folder"]
        state = _read_object(folder / "state.json")
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{folder / 'state.json'} lacks {missing}")
    except RunError as e:
        raise CheckpointError(f"{checkpoints.parent}: cannot resume, the saved state is unreadable ({e})") from None
    return folder, state


def saved_fingerprint(checkpoints: Path) -> dict:
    """The run's config and split hashes stored with its latest state."""
    return saved_state(checkpoints)[1]["fingerprint"]


def config_differences(before: dict, after: dict, ignored: Sequence[str] = RUN_NEUTRAL) -> list[str]:
    """``key: old → new`` for every setting that differs between two config dicts, but those of the
    ``ignored`` sections (by default the ones that never change what a run computes)."""
    flat_before, flat_after = _flatten(before), _flatten(after)
    return [f"{k}: {flat_before.get(k, '(unset)')!r} → {flat_after.get(k, '(unset)')!r}"
            for k in sorted(set(flat_before) | set(flat_after))
            if flat_before.get(k) != flat_after.get(k) and k.split(".")[0] not in ignored]


def file_differences(recorded: dict, loaded: dict) -> list[str]:
    """:func:`config_differences` between the config a run recorded when it wrote its config.yaml and
    that file as loaded now: whole, run-neutral sections too (a cut in them is damage all the same),
    but those a record from before they existed lacks."""
    return config_differences(recorded, loaded, [s for s in RUN_NEUTRAL if s not in recorded])


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys as overrides name them: lists of mappings or lists by entry (``train.phases.0.epochs``)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def verify_run_files(run_dir: Path, info: dict, config: dict) -> None:
    """A finished run's config.yaml (as loaded: ``config``) and split lists must be those its run.json
    records: an edited or damaged config would rebuild another model, or the same one with other
    settings, silently. Runs from before run.json recorded them pass."""
    if "config" in info:
        changed = file_differences(info["config"], config)
        if changed:
            raise CheckpointError(f"{run_dir / 'config.yaml'} is not the config the run was made with "
                                  f"({'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}): it was edited or "
                                  "damaged; restore it (run.json holds the original under 'config')")
    if "splits_sha256" in info:
        now = run_fingerprint(config, run_dir / "splits")["splits"]
        saved = info["splits_sha256"]
        differ = sorted(n for n in set(saved) | set(now) if saved.get(n) != now.get(n))
        if differ:
            raise CheckpointError(f"{run_dir / 'splits'}: {', '.join(differ)} changed since the run was made "
                                  "(run.json records the sha256 of its split lists): restore them from a backup")


def save_state(checkpoints: Path, step: int, model: torch.nn.Module, names: Sequence[str],
               optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict, identity: dict,
               fingerprint: Optional[dict] = None, depends: Sequence[str] = ()) -> None:
    """Write a complete state folder ``checkpoints/step-N``, then point ``latest.json`` at it; older
    folders are removed only after that. ``fingerprint`` (:func:`run_fingerprint`) lets a resume
    refuse a run whose config or splits changed since; ``depends`` names the run's other files
    (relative to the run directory) a resume reads with the state: ``latest.json`` records the
    sha256 of those and of the state's own files."""
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
                                       "scheduler": scheduler.state_dict(), "rng": rng_json, "sha256": hashes,
                                       "fingerprint": fingerprint})
    own = [f"{checkpoints.name}/{folder.name}/{name}" for name in ("state.json", "weights.safetensors",
                                                                   "optimizer.safetensors")]
    write_json(checkpoints / "latest.json", {"folder": folder.name,
                                             "files": file_digests(checkpoints.parent, [*own, *depends])})
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
    except (OSError, ValueError, KeyError, TypeError, CheckpointError) as e:
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
    apply_weights(model, load_checkpoint(path, identity), path)


def apply_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    """Copy weights read from ``path`` into ``model``, checking every name and shape against it."""
    own = model.state_dict()
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise CheckpointError(f"{path}: parameters {unknown[:5]} do not exist in the model built from the run's config")
    for name, tensor in saved.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict(saved, strict=False)
