"""The pieces of an open_clip ViT image tower the models run themselves: patch embedding, the
blocks (one runner for every model), and the map of a token into the joint space."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import nn


def check_vit(visual: nn.Module) -> int:
    """Validate that the image tower is a CLS-pooled open_clip ViT; return its depth L."""
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is None or not hasattr(visual, "class_embedding"):
        raise TypeError(f"image tower {type(visual).__name__} is not an open_clip VisionTransformer; "
                        "HybridCascade-LaFTer needs a ViT backbone (e.g. ViT-B-32)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise TypeError("the image tower must pool the class token (pool_type='tok', no attentional pooler)")
    return len(resblocks)


def embed_patches(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token, positional embedding and ``ln_pre``: [B, 1 + N, W]."""
    x = visual.conv1(images)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def run_blocks(visual: nn.Module, tokens: torch.Tensor, first: int, last: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Run blocks ``first..last`` (1-based) on batch-first tokens [B, T, W], yielding (layer, its
    batch-first output) after each block; the last output yielded is the input of block last + 1."""
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = tokens if batch_first else tokens.transpose(0, 1)
    for layer in range(first, last + 1):
        x = visual.transformer.resblocks[layer - 1](x)
        yield layer, x if batch_first else x.transpose(0, 1)


def cls_after_blocks(visual: nn.Module, tokens: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Run the blocks up to max(layers) and return the CLS token after each of ``layers``: [n, B, W]."""
    wanted = set(layers)
    # Copies, not views: a view would keep each block's whole [B, T, W] output alive.
    return torch.stack([x[:, 0].clone() for layer, x in run_blocks(visual, tokens, 1, max(layers))
                        if layer in wanted])


def project(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Map tokens into the joint space with the tower's own ``ln_post`` and ``proj``."""
    x = visual.ln_post(tokens)
    proj: Optional[torch.Tensor] = visual.proj
    return x @ proj if proj is not None else x
