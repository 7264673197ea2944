"""Baselines that need no training: zero-shot CLIP."""
from __future__ import annotations

from .backbone import backbone_from_config
from .config import Config
from .data import load_splits, make_dataset, make_loader
from .evaluation import clip_classifier, compute_metrics, predict
from .run import cache_dir_of, make_accelerator
from .text import load_templates, zeroshot_weights


def zeroshot_eval(cfg: Config, split: str = "test", progress: bool = True) -> dict:
    """Zero-shot CLIP on one split: cosine similarity to each class's averaged template embedding."""
    accelerator = make_accelerator(cfg)
    cache = cache_dir_of(cfg)
    backbone = backbone_from_config(cfg.backbone)
    data = load_splits(cfg.data, cfg.seed, cache)
    weights = zeroshot_weights(backbone, data.wheel, load_templates(data.wheel, cfg.text.templates), cache,
                               accelerator.device)
    model = accelerator.prepare_model(backbone.model, evaluation_mode=True).eval()
    loader = accelerator.prepare_data_loader(
        make_loader(make_dataset(data[split], data.wheel, backbone.preprocess, cfg.data), cfg.data.eval_batch_size,
                    False, cfg.seed, cfg.data.num_workers))
    classify = clip_classifier(model, weights, backbone.model.logit_scale.exp().item(), accelerator)
    return compute_metrics(predict(classify, loader, accelerator, progress=progress), data.wheel)
