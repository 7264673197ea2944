#!/usr/bin/env python
"""Contrastively pre-train the toy CLIP that ships with hclafter, on the synthetic emotion world.

    .venv/bin/python scripts/train_toy_clip.py                      # rewrites the shipped weights
    .venv/bin/python scripts/train_toy_clip.py --out /tmp/toy_clip  # a copy elsewhere

The model is an ordinary open_clip CLIP (12 image blocks, so the default HybridCascade stages
apply; 32-pixel images in 8-pixel patches, 16 per image; a 2-layer text tower with open_clip's own BPE
vocabulary). It learns from clean ``world.generate`` images paired with ``world.caption`` captions
(several per image, one drawn per epoch) with the symmetric InfoNCE loss of CLIP. Everything is
seeded: the same seed gives the same weights on the same machine (and, as measured, the same
zero-shot accuracy on another machine with other torch/numpy versions).

Writes ``toy_clip.safetensors`` (fp16), ``config.json`` (the open_clip model config, for
``backbone.model_cfg``) and ``training.json`` (settings, timings and the zero-shot accuracy on the
"wild" world's test split at 150 images per class, generated from another seed than the
pre-training images).
About 2 minutes with ``--threads 1`` on a quiet CPU core (2026-12-05).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hclafter.data import world

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 12, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}
# Seed-sequence keys that keep the pre-training images apart from any ``generate_synthetic`` data
# (which draws from ``default_rng(seed)``): the demo's test images are never seen in pre-training.
IMAGE_STREAM, CAPTION_STREAM, PROBE_STREAM = 101, 102, 103
OUT = Path(__file__).resolve().parents[1] / "src" / "hclafter" / "resources" / "toy_clip"
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → normalised float [N, 3, H, W], exactly what the backbone's preprocess gives."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def encode_text(model: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut after the longest caption. The text tower is causal and
    pools at the end-of-text token, so the padding it skips cannot change the result."""
    n = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ model.text_projection


def build_data(args) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    images = world.generate(args.per_class, MODEL_CFG["vision_cfg"]["image_size"],
                            np.random.SeedSequence([args.seed, IMAGE_STREAM]))
    texts = world.captions(images, args.captions, np.random.SeedSequence([args.seed, CAPTION_STREAM]))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    tokens = tokenizer([t for group in texts for t in group])
    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length].reshape(len(images), args.captions, length)
    return np.stack([im.image for im in images]), tokens, np.array([im.label for im in images])


@torch.no_grad()
def probe_accuracy(model: open_clip.CLIP, probe: tuple[torch.Tensor, np.ndarray], tokenizer) -> float:
    """Zero-shot accuracy with plain class-name prompts on held-out world images (a progress signal)."""
    model.eval()
    texts = [f.format(c) for c in world.CLASSES for f in ("a picture that evokes {}.", "{}.", "an image full of {}.")]
    t = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).view(len(world.CLASSES), 3, -1).mean(1)
    f = F.normalize(model.encode_image(probe[0]), dim=-1)
    model.train()
    return float(((f @ t.T).argmax(1).numpy() == probe[1]).mean())


def train(args) -> tuple[open_clip.CLIP, dict]:
    torch.manual_seed(args.seed)
    started = time.time()
    images, tokens, _ = build_data(args)
    probe_images = world.generate(25, MODEL_CFG["vision_cfg"]["image_size"], np.random.SeedSequence([args.seed, PROBE_STREAM]))
    probe = (to_input(np.stack([im.image for im in probe_images])), np.array([im.label for im in probe_images]))
    data_s = time.time() - started
    print(f"world: {len(images)} images x {args.captions} captions ({tokens.shape[-1]} tokens at most) "
          f"in {data_s:.0f}s", flush=True)

    model = open_clip.CLIP(**MODEL_CFG)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(images) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(0.05 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    generator = torch.Generator().manual_seed(args.seed)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    labels = torch.arange(args.batch_size)
    step, history = 0, []
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(images), generator=generator)
        pick = torch.randint(args.captions, (len(images),), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            x = to_input(images[idx.numpy()])
            t = tokens[idx, pick[idx]]
            t = t[:, :int((t != 0).sum(dim=1).max())]
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(encode_text(model, t), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            running += loss.item()
            if step % 20 == 0 or b == steps_per_epoch - 1:
                print(f"epoch {epoch}/{args.epochs} step {step}/{total}  loss {loss.item():.3f}  "
                      f"scale {model.logit_scale.exp().item():.1f}  {time.time() - started:.0f}s", flush=True)
        acc = probe_accuracy(model, probe, tokenizer)
        history.append({"epoch": epoch, "loss": running / steps_per_epoch, "probe_zeroshot_accuracy": acc})
        print(f"epoch {epoch}: mean loss {running / steps_per_epoch:.3f}, zero-shot on held-out world images "
              f"{acc:.3f}", flush=True)
    model.eval()
    info = {"seed": args.seed, "per_class": args.per_class, "images": len(images), "captions_per_image": args.captions,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "steps": total, "history": history, "data_s": round(data_s, 1),
            "train_s": round(time.time() - started, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    return model, info


def wild_zeroshot(weights: Path) -> dict:
    """Zero-shot accuracy of ``weights`` on the test split of the "wild" world at 150 images per
    class, as the demo's settings make it: the figure ``TOY_CLIP_ZEROSHOT_ACCURACY`` documents."""
    from hclafter.engine.frozen import zeroshot_eval
    from hclafter.apps.demo import demo_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(Path(tmp), weights=weights, device="cpu", world="wild")
        cfg.data.synthetic.per_class = 150
        metrics = zeroshot_eval(cfg, "test", progress=False)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: the shipped {OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=1000, help="pre-training images per emotion")
    p.add_argument("--captions", type=int, default=4, help="captions per image (one drawn per epoch)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, info = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "toy_clip.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(weights))
    (args.out / "config.json").write_text(json.dumps(MODEL_CFG, indent=2) + "\n", encoding="utf-8")
    info["wild_test_zeroshot"] = wild_zeroshot(weights)
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB) in {info['train_s']:.0f}s of training; zero-shot "
          f"accuracy on the wild world's test split: {info['wild_test_zeroshot']['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
