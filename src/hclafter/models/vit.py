"""The pieces of an open_clip ViT image tower the models run themselves: patch embedding, the
blocks (one runner for every model), and the map of a token into the joint space."""
from __future__ import annotations

import functools
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
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


def _slow_path(attn: nn.MultiheadAttention, x: torch.Tensor) -> bool:
    """Whether ``nn.MultiheadAttention`` would take its slow path (training, autograd, autocast)
    rather than its fused inference kernel."""
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in attn.parameters()))
    return attn.training or grad or torch.is_autocast_enabled(x.device.type)


def _attention(block: ResidualAttentionBlock, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None,
               v_x: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A block's self-attention as one QKV product over the batch-first tokens and
    ``scaled_dot_product_attention``, where ``nn.MultiheadAttention`` would take its slow path:
    that path projects the tokens transposed, which with a frozen weight becomes a batched product
    over one copy of the weight per token position. Otherwise open_clip's own call (fused path)."""
    attn = block.attn
    if k_x is not None or v_x is not None or attn_mask is not None or not _slow_path(attn, q_x):
        return ResidualAttentionBlock.attention(block, q_x, k_x, v_x, attn_mask)
    batch, tokens, width = q_x.shape
    qkv = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if attn.training else 0.0)
    return F.linear(out.transpose(1, 2).reshape(batch, tokens, width), attn.out_proj.weight, attn.out_proj.bias)


def use_sdpa_attention(visual: nn.Module) -> None:
    """Route the self-attention of the tower's plain batch-first blocks through ``_attention``
    (same arithmetic: bit for bit on small towers, last-bit rounding on large ones)."""
    for block in getattr(getattr(visual, "transformer", None), "resblocks", ()):
        attn = getattr(block, "attn", None)
        if (type(block) is ResidualAttentionBlock and isinstance(attn, nn.MultiheadAttention) and attn.batch_first
                and attn.in_proj_weight is not None and attn.bias_k is None):
            block.attention = functools.partial(_attention, block)


def run_block(visual: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Block ``layer`` (1-based) on batch-first tokens [B, T, W]."""
    block = visual.transformer.resblocks[layer - 1]
    if not getattr(visual.transformer, "batch_first", True):
        return block(x.transpose(0, 1)).transpose(0, 1)
    return block(x)


def run_blocks(visual: nn.Module, tokens: torch.Tensor, first: int, last: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Run blocks ``first..last`` (1-based) on batch-first tokens [B, T, W], yielding (layer, its
    batch-first output) after each block; the last output yielded is the input of block last + 1."""
    x = tokens
    for layer in range(first, last + 1):
        x = run_block(visual, layer, x)
        yield layer, x


class _ClsTap(torch.autograd.Function):
    """tokens → (the same tokens, a copy of their CLS token). The backward adds the CLS gradient
    into the tokens' gradient in one scatter, where indexing (``x[:, 0]``) would materialise a
    zero-filled [B, T, W] gradient and add it to the residual stream's: same values, less traffic."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.shape = tokens.shape
        return tokens.view_as(tokens), tokens[:, 0].clone()

    @staticmethod
    def backward(ctx, grad_tokens: Optional[torch.Tensor], grad_cls: Optional[torch.Tensor]) -> torch.Tensor:
        if grad_cls is None:
            return grad_tokens
        if grad_tokens is None:
            grad_tokens = grad_cls.new_zeros(ctx.shape)
        return grad_tokens.select_scatter(grad_tokens[:, 0] + grad_cls, 1, 0)


def tap_cls(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, a copy of their CLS token) for reading the CLS token of tokens that flow on."""
    return _ClsTap.apply(tokens)


def cls_after_blocks(visual: nn.Module, tokens: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Run the blocks up to max(layers) and return the CLS token after each of ``layers``: [n, B, W]."""
    wanted, last = set(layers), max(layers)
    x, cls = tokens, []
    for layer in range(1, last + 1):
        x = run_block(visual, layer, x)
        if layer == last:  # nothing runs after it: a plain copy (a view would keep [B, T, W] alive)
            cls.append(x[:, 0].clone())
        elif layer in wanted:
            x, token = tap_cls(x)
            cls.append(token)
    return torch.stack(cls)


def project(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Map tokens into the joint space with the tower's own ``ln_post`` and ``proj``."""
    x = visual.ln_post(tokens)
    proj: Optional[torch.Tensor] = visual.proj
    return x @ proj if proj is not None else x
