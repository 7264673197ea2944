"""CoOp (Zhou et al., IJCV 2022): learned context vectors in the frozen CLIP text tower, classifying
the frozen tower's final image feature by CLIP's cosine at CLIP's temperature."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from ..core.config import ModelConfig
from .backbone import Backbone
from .final import FinalFeatureClassifier
from .text import TextCorpusError, overlong_texts

PLACEHOLDER = "X"  # CoOp's stand-in word for each context vector in the tokenised prompt


class TextTower(nn.Module):
    """The frozen CLIP text tower from the token embeddings on (open_clip's ``encode_text`` after its
    embedding lookup), so that learned vectors can stand in for tokens."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, L, W] and the token ids they stand for [N, L] (which locate the end of
        each text; L may stop short of the context length, see :func:`pooled_length`) → text features [N, D]."""
        n = embeddings.shape[1]
        mask = None if self.attn_mask is None else self.attn_mask[:n, :n]
        x = self.transformer(embeddings + self.positional_embedding[:n].to(embeddings.dtype), attn_mask=mask)
        x = text_global_pool(self.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)
        return self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection


def pooled_length(clip: nn.Module, tokens: torch.Tensor) -> int:
    """The positions the pooled text features depend on: up to the last text's end token when the
    tower's mask is causal (a position sees only those before it), so the padding after it need not
    run through the tower at every step (about a quarter of the 77 positions for CoOp's prompts);
    all of them otherwise."""
    pool = clip.text_pool_type
    if clip.attn_mask is None or pool not in ("argmax", "eos"):
        return tokens.shape[1]
    ends = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return int(ends.max()) + 1


class CoOp(FinalFeatureClassifier):
    """Each class's prompt is "X X … X {class}." with its first ``context_tokens`` token embeddings
    replaced by learned context vectors (group ``prompts``): one context shared by every class, or
    one per class (CoOp's class-specific context). The context starts N(0, 0.02), as in the paper."""

    shared_classifier = False
    group_owners = {"context": "prompts", "text": "backbone"}

    def __init__(self, backbone: Backbone, class_names: Sequence[str], context_tokens: int = 16,
                 class_specific: bool = False) -> None:
        super().__init__(backbone)
        clip = backbone.model
        prompts = [" ".join([PLACEHOLDER] * context_tokens + [name.replace("_", " ")]) + "." for name in class_names]
        long = overlong_texts(backbone.tokenizer, prompts)
        if long:
            raise TextCorpusError(f"model.context_tokens={context_tokens}: the prompt {prompts[long[0]]!r} exceeds the "
                                  f"text context of {backbone.tokenizer.context_length} tokens; use fewer")
        tokens = backbone.tokenizer(prompts)
        tokens = tokens[:, :pooled_length(clip, tokens)]
        with torch.no_grad():
            embedded = clip.token_embedding(tokens).float()
        self.text = TextTower(clip)
        # The frozen parts of the prompts around the context: start-of-text, and name, period, end, padding.
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1], persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + context_tokens:], persistent=False)
        shape = (len(class_names), context_tokens, embedded.shape[-1]) if class_specific else \
            (context_tokens, embedded.shape[-1])
        self.context = nn.Parameter(torch.empty(shape).normal_(std=0.02))
        self.logit_scale = clip.logit_scale.exp().item()

    @classmethod
    def from_config(cls, backbone: Backbone, num_classes: int, cfg: ModelConfig,
                    class_embeddings: Optional[torch.Tensor] = None,
                    class_names: Optional[Sequence[str]] = None) -> "CoOp":
        if class_names is None or len(class_names) != num_classes:
            raise ValueError(f"model.method=coop writes a prompt per class: it needs the {num_classes} class names")
        return cls(backbone, class_names, cfg.context_tokens, cfg.class_specific_context)

    @classmethod
    def trainable_groups(cls, cfg: ModelConfig, depth: int) -> set[str]:
        return {"prompts"}

    def class_features(self) -> torch.Tensor:
        """The text tower's features of every class's prompt with the current context: [C, D]."""
        context = self.context if self.context.dim() == 3 else self.context.expand(len(self.tokens), -1, -1)
        embeddings = torch.cat([self.prefix, context.to(self.prefix.dtype), self.suffix], dim=1)
        return self.text(embeddings, self.tokens)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        text = F.normalize(self.class_features(), dim=-1)
        return self.logit_scale * F.normalize(features, dim=-1) @ text.T.to(features.dtype)
