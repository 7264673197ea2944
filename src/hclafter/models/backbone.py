"""CLIP backbones from open_clip, with weights from local files and a stable identity.

The identity (architecture + weights hash) keys every cache and is stored in run directories
instead of a copy of the frozen weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from ..core.config import BackboneConfig, ConfigError, looks_like_path
from ..core.integrity import sha256_file
from .vit import use_sdpa_attention

# Keys OpenAI stores beside the weights; their presence marks an OpenAI checkpoint (QuickGELU).
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


class BackboneError(RuntimeError):
    """The backbone cannot be built or its weights cannot be loaded."""


@dataclass
class Backbone:
    model: nn.Module  # the open_clip CLIP model
    tokenizer: Callable[..., torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]  # eval transform: PIL image -> tensor
    identity: dict[str, Any]
    preprocess_cfg: Optional[Any] = None  # open_clip PreprocessCfg: size, mean, std, interpolation

    @property
    def identity_key(self) -> str:
        """Short hash of the identity, for cache file names."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a checkpoint file; return (state dict, whether it is OpenAI-format).

    The OpenAI JIT archive is loaded with ``torch.jit.load``, which trusts the file; every other
    format is read without unpickling code (safetensors, or ``torch.load(weights_only=True)``).
    """
    try:
        if path.suffix == ".safetensors":
            state, is_openai = load_file(str(path)), False
        elif _is_torchscript(path):
            state, is_openai = torch.jit.load(str(path), map_location="cpu").state_dict(), True
        else:
            state, is_openai = torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:
        raise BackboneError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); pass an OpenAI .pt "
                            "archive, a state dict (.pt/.bin) or a .safetensors file") from None
    if not is_openai:
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise BackboneError(f"{path}: expected a state dict, found {type(state).__name__}")
        is_openai = any(k in state for k in OPENAI_META_KEYS)
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in OPENAI_META_KEYS}
    return state, is_openai


def _build(cfg: BackboneConfig, quick_gelu: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        if cfg.model_cfg is not None:
            model_cfg = dict(cfg.model_cfg)
            model_cfg["quick_gelu"] = quick_gelu
            try:
                return open_clip.CLIP(**model_cfg)
            except TypeError as e:
                raise BackboneError(f"backbone.model_cfg is not a valid open_clip model config: {e}") from None
        if open_clip.get_model_config(cfg.name) is None:
            raise BackboneError(f"backbone.name: unknown open_clip architecture {cfg.name!r}; "
                                f"choose one of open_clip.list_models() or give backbone.model_cfg")
        return open_clip.create_model(cfg.name, pretrained=None, force_quick_gelu=quick_gelu)


def _architecture(cfg: BackboneConfig) -> dict[str, Any]:
    model_cfg = cfg.model_cfg if cfg.model_cfg is not None else open_clip.get_model_config(cfg.name)
    return {"name": cfg.name, "model_cfg": model_cfg}


def tower_depth(cfg: BackboneConfig) -> int:
    """The number of image blocks of the configured architecture, without building it (a
    ConfigError naming ``backbone.name`` for an unknown or non-ViT one)."""
    if cfg.model_cfg is not None:
        vision = cfg.model_cfg.get("vision_cfg")
        if not isinstance(vision, dict) or not isinstance(vision.get("layers"), int):
            raise ConfigError("backbone.model_cfg.vision_cfg.layers: an integer number of image blocks is required")
        return vision["layers"]
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ConfigError(f"backbone.name: unknown open_clip architecture {cfg.name!r} "
                          "(see open_clip.list_models(), or give backbone.model_cfg)")
    layers = model_cfg["vision_cfg"].get("layers")
    if not isinstance(layers, int):
        raise ConfigError(f"backbone.name: {cfg.name} has no ViT image tower (HybridCascade-LaFTer needs a ViT)")
    return layers


def load_backbone(name: str = "ViT-B-32", pretrained: Optional[str] = None, *,
                  quick_gelu: Optional[bool] = None, model_cfg: Optional[dict[str, Any]] = None,
                  init_seed: int = 0) -> Backbone:
    """Build an open_clip model and load its weights from a local file or an open_clip tag; without
    ``pretrained`` it is randomly initialised (a caller of the API asks for that explicitly)."""
    return _load(BackboneConfig(name, pretrained, quick_gelu, model_cfg, init_seed=init_seed))


def backbone_from_config(cfg: BackboneConfig) -> Backbone:
    """The backbone of a run config. A config without weights is refused unless it says
    ``random_init: true``: a forgotten ``-c`` would otherwise train a random ViT for minutes."""
    if cfg.pretrained is None and not cfg.random_init:
        raise BackboneError(f"backbone {cfg.name} has no weights: set backbone.pretrained=/path/to/weights "
                            "(or an open_clip tag), or backbone.random_init=true for a random-initialised backbone")
    return _load(cfg)


def _load(cfg: BackboneConfig) -> Backbone:
    identity: dict[str, Any] = {"architecture": _architecture(cfg)}
    pretrained = cfg.pretrained
    if pretrained is None:
        qg = bool(cfg.quick_gelu)
        model = _build(cfg, qg)
        identity["weights"] = f"random-init(seed={cfg.init_seed})"
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        state, is_openai = read_state_dict(path)
        qg = is_openai if cfg.quick_gelu is None else cfg.quick_gelu
        model = _build(cfg, qg)
        try:  # resizing the position grid of weights for another architecture fails in its own ways (fp16 on CPU)
            open_clip.model.resize_pos_embed(state, model)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            raise BackboneError(f"{path}: weights do not fit backbone.name={cfg.name!r} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}); pass the weights of that architecture, or the "
                                "backbone.name the weights are for") from None
        identity["weights"] = {"file": path.name, "sha256": file_sha256(path)}
    else:
        qg, model = _from_tag(cfg, pretrained)
        identity["weights"] = {"open_clip_tag": pretrained}
    identity["quick_gelu"] = qg
    model.eval()
    use_sdpa_attention(model.visual)
    preprocess_cfg = open_clip.transform.PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    preprocess = open_clip.transform.image_transform_v2(preprocess_cfg, is_train=False)
    context = None if cfg.model_cfg is None else cfg.model_cfg.get("text_cfg", {}).get("context_length", 77)
    return Backbone(model, _tokenizer(cfg.name, context), preprocess, identity, preprocess_cfg)


@lru_cache(maxsize=8)
def _tokenizer(name: str, context_length: Optional[int]) -> Callable[..., torch.Tensor]:
    """The architecture's tokenizer, or for a model_cfg the CLIP one of its context: built once per
    process (building the BPE tables takes 0.1 s; a tokenizer holds no state but a memo)."""
    if context_length is None:
        return open_clip.get_tokenizer(name)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _from_tag(cfg: BackboneConfig, tag: str) -> tuple[bool, nn.Module]:
    if looks_like_path(tag):
        raise BackboneError(f"backbone.pretrained: weights file not found: {tag}")
    if cfg.model_cfg is not None:
        raise BackboneError("backbone.model_cfg cannot be combined with an open_clip tag; give a weights file "
                            "as backbone.pretrained, or drop model_cfg and name a built-in architecture")
    tags = open_clip.list_pretrained_tags_by_model(cfg.name)
    if tag not in tags:
        raise BackboneError(f"backbone.pretrained: {tag!r} is neither a file nor an open_clip tag of "
                            f"{cfg.name} (tags: {tags})")
    pretrained_cfg = open_clip.get_pretrained_cfg(cfg.name, tag)
    qg = pretrained_cfg.get("quick_gelu", False) if cfg.quick_gelu is None else cfg.quick_gelu
    host, port = _download_server(pretrained_cfg)
    online = _reachable(host, port)
    try:
        with contextlib.nullcontext() if online else _hub_offline():
            model = open_clip.create_model(cfg.name, pretrained=tag, force_quick_gelu=qg)
    except Exception as e:
        why = type(e).__name__ if online else f"no connection to {host}, and they are not in the local cache"
        raise BackboneError(
            f"could not fetch open_clip weights {cfg.name}/{tag} ({why}); this needs network "
            f"access. Download the weights file elsewhere (e.g. OpenAI's ViT-B-32.pt) and pass it as "
            f"backbone.pretrained=/path/to/weights.pt"
        ) from None
    return qg, model


def _download_server(pretrained_cfg: dict[str, Any]) -> tuple[str, int]:
    """Host and port open_clip fetches a tag's weights from: the Hugging Face hub where the tag has
    a hub entry (open_clip prefers it), else the tag's URL; the proxy instead, where one is set."""
    if pretrained_cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        url = constants.ENDPOINT
    else:
        url = pretrained_cfg.get("url", "")
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _reachable(host: str, port: int, seconds: float = 5.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``seconds``, name lookup included
    (a lookup that hangs is waited for in a daemon thread, not by the caller)."""
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(opened)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face hub offline mode: without a network the hub client retries for a minute before
    it looks in its cache; offline, it answers from the cache at once. The environment variable
    is read at import, so the parsed flag is set (and restored)."""
    if not open_clip.pretrained.has_hf_hub():
        yield
        return
    from huggingface_hub import constants

    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
