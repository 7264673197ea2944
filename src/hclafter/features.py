"""Layer features: the CLS token after chosen blocks of an open_clip ViT, in the joint space."""
from __future__ import annotations

from typing import Optional, Sequence

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


def cls_after_blocks(visual: nn.Module, tokens: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Run the blocks up to max(layers) (1-based) and return the CLS token after each: [n, B, W]."""
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    x = tokens if batch_first else tokens.transpose(0, 1)
    wanted = set(layers)
    out: list[torch.Tensor] = []
    for depth, block in enumerate(transformer.resblocks[: max(layers)], start=1):
        x = block(x)
        if depth in wanted:
            # A copy, not a view: a view would keep the block's whole [B, N, W] output alive.
            out.append((x[:, 0] if batch_first else x[0]).clone())
    return torch.stack(out)


def project(visual: nn.Module, cls_tokens: torch.Tensor) -> torch.Tensor:
    """Map CLS tokens into the joint space with the tower's own ``ln_post`` and ``proj``."""
    x = visual.ln_post(cls_tokens)
    proj: Optional[torch.Tensor] = visual.proj
    return x @ proj if proj is not None else x
