"""Stage 1: the text-only classifier, trained on CLIP text embeddings of class descriptions.

Also the zero-shot classifier (template embeddings averaged per class), which shares the
text encoding and its cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..core.config import TextConfig
from ..core.emotions import MIKELS8, Wheel
from ..core.integrity import rebuild_warning
from .backbone import Backbone


class TextCorpusError(ValueError):
    """A descriptions or templates problem, naming the file and class."""


class Stage1Error(TextCorpusError):
    """Stage 1 cannot train (a non-finite loss); a TextCorpusError so the CLI reports it as one."""


def _resource(*parts: str):
    return resources.files("hclafter").joinpath("resources", *parts)


def load_descriptions(wheel: Wheel, path: Optional[str] = None) -> dict[str, list[str]]:
    """Class descriptions ``{class: [sentence, ...]}``; the shipped corpus when ``path`` is None.

    For the 2-class polarity space the shipped Mikels-8 sentences are pooled by polarity.
    """
    if path is None and wheel.name == "polarity2":
        mikels = load_descriptions(MIKELS8)
        return {name: [t for c, p in zip(MIKELS8.classes, MIKELS8.polarity) if p == pol for t in mikels[c]]
                for name, pol in zip(wheel.classes, wheel.polarity)}
    source = _resource("descriptions", f"{wheel.name}.json") if path is None else Path(path).expanduser()
    if path is None and not source.is_file():
        raise TextCorpusError(f"no shipped descriptions for label space {wheel.name!r}; set text.descriptions to a "
                              "JSON file {class: [sentence, ...]} (hclafter describe can write one)")
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TextCorpusError(f"text.descriptions: file not found: {source}") from None
    except json.JSONDecodeError as e:
        raise TextCorpusError(f"{source}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise TextCorpusError(f"{source}: expected an object {{class: [sentence, ...]}}")
    by_name = {str(k).strip().lower(): v for k, v in raw.items()}
    out: dict[str, list[str]] = {}
    for name in wheel.classes:
        sentences = by_name.get(name)
        if not sentences or not isinstance(sentences, list):
            raise TextCorpusError(f"{source}: no descriptions for class {name!r} (label space {wheel.name}: "
                                  f"{list(wheel.classes)})")
        bad = [i for i, t in enumerate(sentences) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise TextCorpusError(f"{source}: class {name!r}: entries {bad[:5]} are not non-empty strings")
        out[name] = [t.strip() for t in sentences]
    extra = sorted(set(by_name) - set(wheel.classes))
    if extra:
        raise TextCorpusError(f"{source}: classes {extra} are not in label space {wheel.name} {list(wheel.classes)}")
    return out


def load_templates(wheel: Wheel, templates: Optional[Sequence[str]] = None) -> list[str]:
    if templates is None:
        shipped = json.loads(_resource("templates.json").read_text(encoding="utf-8"))
        if wheel.name not in shipped:
            raise TextCorpusError(f"no shipped templates for label space {wheel.name!r}; set text.templates to a "
                                  "list of strings with one '{}' each")
        templates = shipped[wheel.name]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise TextCorpusError(f"text.templates: each template needs exactly one '{{}}' placeholder, got {bad}")
    return list(templates)


def class_texts(wheel: Wheel, descriptions: dict[str, list[str]], templates: Sequence[str],
                tokenizer=None, source: str = "text.descriptions") -> tuple[list[str], list[int]]:
    """Descriptions plus templates formatted with each class name, with their class indices.

    With a tokenizer, a text longer than its context is an error naming the class and sentence
    (open_clip would silently cut it).
    """
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(wheel.classes):
        for text in descriptions[name] + [t.format(name.replace("_", " ")) for t in templates]:
            texts.append(text)
            labels.append(label)
    if tokenizer is not None:
        too_long = overlong_texts(tokenizer, texts)
        if too_long:
            i = too_long[0]
            raise TextCorpusError(f"{source}: {len(too_long)} text(s) exceed the {tokenizer.context_length}-token "
                                  f"context, e.g. class {wheel.classes[labels[i]]!r}: {texts[i]!r}; shorten them")
    return texts, labels


def overlong_texts(tokenizer, texts: Sequence[str]) -> list[int]:
    """Indices of the texts longer than the tokenizer's context (open_clip would cut them silently)."""
    encode = getattr(tokenizer, "encode", None)
    limit = getattr(tokenizer, "context_length", None)
    if encode is None or limit is None:
        return []
    return [i for i, t in enumerate(texts) if len(encode(t)) + 2 > limit]


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: Sequence[str], cache_dir: Optional[Path] = None,
                 batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """L2-normalised text embeddings [N, D], cached on disk by backbone identity and texts.

    A cache entry carries a content hash; one that fails it (a flipped bit, a torn or foreign file)
    is rebuilt after a warning naming it, never used: stage 1 would train on it without complaint."""
    key = hashlib.sha256(json.dumps([backbone.identity, list(texts)], sort_keys=True).encode()).hexdigest()[:24]
    cache = cache_dir / "text" / f"{key}.safetensors" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            return load_checkpoint(cache, backbone.identity)["features"]
        except CheckpointError as e:
            rebuild_warning(cache, f"text-embedding cache entry unusable ({str(e).removeprefix(f'{cache}: ')})")
    too_long = overlong_texts(backbone.tokenizer, texts)
    if too_long:
        raise TextCorpusError(f"{len(too_long)} text(s) exceed the {backbone.tokenizer.context_length}-token context, "
                              f"e.g. {texts[too_long[0]]!r}; shorten them")
    model = backbone.model.to(device)
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = backbone.tokenizer(list(texts[start:start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    features = torch.cat(chunks)
    if cache is not None:
        save_checkpoint(cache, {"features": features}, backbone.identity)
    return features


def train_text_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: TextConfig,
                          seed: int) -> tuple[torch.Tensor, list[float]]:
    """Full-batch AdamW on noisy unit-norm text features; returns (U [C, D], loss per step).

    Gaussian noise (σ = ``noise_std`` per dimension) is added to the features at every step and
    the linear map is applied to them directly, as in LaFTer; at inference the image features are
    unit-norm like the clean text features.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(features.shape[1], num_classes, bias=False)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weight = None
    if cfg.balance_classes:
        counts = torch.bincount(labels, minlength=num_classes).float()
        weight = counts.sum() / (num_classes * counts.clamp(min=1))
    history = []
    for step in range(cfg.steps):
        noisy = features + torch.randn(features.shape, generator=generator) * cfg.noise_std
        loss = F.cross_entropy(linear(noisy), labels, weight=weight, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            bad = int(((features.norm(dim=1) - 1).abs() > 1e-3).logical_or(~torch.isfinite(features).all(1)).sum())
            raise Stage1Error(f"stage 1 (text classifier): non-finite loss {loss.item()} at step {step + 1} of "
                              f"{cfg.steps}; " + (f"{bad} of {len(features)} text embeddings are not finite unit "
                                                  "vectors: check the backbone weights (backbone.pretrained)" if bad
                                                  else "the embeddings are sound: lower text.lr"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return linear.weight.detach().clone(), history


@torch.no_grad()
def zeroshot_weights(backbone: Backbone, wheel: Wheel, templates: Sequence[str], cache_dir: Optional[Path] = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Zero-shot CLIP classifier [C, D]: each class's template embeddings, averaged and re-normalised."""
    texts = [t.format(name.replace("_", " ")) for name in wheel.classes for t in templates]
    features = encode_texts(backbone, texts, cache_dir, device=device).view(wheel.num_classes, len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def train_stage1(backbone: Backbone, wheel: Wheel, cfg: TextConfig, seed: int, cache_dir: Optional[Path] = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict]:
    """Stage 1: encode the descriptions and templates, train U on them; returns (U [C, D], a summary)."""
    texts, labels = class_texts(wheel, load_descriptions(wheel, cfg.descriptions), load_templates(wheel, cfg.templates),
                                backbone.tokenizer, cfg.descriptions or f"shipped {wheel.name} descriptions")
    features = encode_texts(backbone, texts, cache_dir, cfg.batch_size, device)
    key = stage1_key(backbone, texts, labels, cfg, seed)
    cache = cache_dir / "stage1" / f"{key}.safetensors" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            saved = load_checkpoint(cache, backbone.identity)
            loss = saved["final_loss"].tolist()
            return saved["weight"], {"texts": len(texts), "steps": cfg.steps, "final_loss": loss[0] if loss else None}
        except CheckpointError as e:
            rebuild_warning(cache, f"stage-1 cache entry unusable ({str(e).removeprefix(f'{cache}: ')})")
    weight, history = train_text_classifier(features, torch.tensor(labels), wheel.num_classes, cfg, seed)
    if cache is not None:
        save_checkpoint(cache, {"weight": weight, "final_loss": torch.tensor(history[-1:], dtype=torch.float64)},
                        backbone.identity)
    return weight, {"texts": len(texts), "steps": cfg.steps, "final_loss": history[-1] if history else None}


def stage1_key(backbone: Backbone, texts: Sequence[str], labels: Sequence[int], cfg: TextConfig, seed: int) -> str:
    """What stage 1's result depends on: the backbone, the texts and labels, the text settings and
    the seed (and torch's thread count, which changes the order of float sums). Every run of a sweep
    sharing them reads one cached classifier instead of training it again (stage 1 draws from its own
    generator, so the runs' random streams are unchanged)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("descriptions", "templates")}
    return hashlib.sha256(json.dumps([backbone.identity, list(texts), list(labels), settings, seed,
                                      torch.get_num_threads()],
                                     sort_keys=True, default=str).encode()).hexdigest()[:24]
