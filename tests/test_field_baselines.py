"""The field's baselines (SPEC §11) against hand computations: Tip-Adapter's logits, the probes' C
search, CLIP-Adapter's residual, CoOp's prompts; and runs whose every choice (C, penalty, α, β,
ratio, epoch, checkpoint) stays the same when the test labels are permuted."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hclafter
from hclafter.core.checkpoint import load_checkpoint
from hclafter.core.config import ConfigError, ModelConfig, load_config
from hclafter.core.emotions import MIKELS8
from hclafter.data import load_splits
from hclafter.data.splits import save_run_splits
from hclafter.engine.run import train_run
from hclafter.models import (CLIPAdapter, CoOp, LabelledFeatures, LinearProbe, TipAdapter, build_model, cache_applies,
                             check_config)
from hclafter.models.probes import logistic_regression
from hclafter.models.selection import LOG_GRID, log_search, validation_score

from .conftest import ROOT, TINY_CONFIG


def test_tip_adapter_logits_on_three_toy_vectors(tiny_backbone):
    """A cache of three training vectors (two classes) in the first two of the 32 dimensions, text
    classifier U = the first two unit vectors, α = 0.5, β = 2, and the image feature (3, 4): every
    term written out by hand."""
    def plane(*rows: list[float]) -> torch.Tensor:
        return F.pad(torch.tensor(rows), (0, 30))

    model = TipAdapter(tiny_backbone, 2, plane([1.0, 0.0], [0.0, 1.0]))
    train = LabelledFeatures(plane([2.0, 0.0], [0.0, 5.0], [0.6, 0.8])[None], torch.tensor([0, 1, 1]))
    model.fit(train, train)
    assert torch.equal(model.cache_keys, plane([1.0, 0.0], [0.0, 1.0], [0.6, 0.8]))  # unit keys
    assert torch.equal(model.cache_values, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    model.alpha.fill_(0.5)
    model.beta.fill_(2.0)
    # f = (3, 4)/5 = (0.6, 0.8): text scores 0.6 and 0.8; affinities with the keys 0.6, 0.8, 1.0
    class0 = 0.6 + 0.5 * math.exp(-2 * (1 - 0.6))
    class1 = 0.8 + 0.5 * (math.exp(-2 * (1 - 0.8)) + math.exp(-2 * (1 - 1.0)))
    with torch.no_grad():
        got = model.classify(plane([3.0, 4.0]))
    assert got[0].tolist() == pytest.approx([class0, class1], abs=1e-6)


def test_the_log_search_finds_the_best_value_to_its_resolution():
    """A score peaking at C = 10^0.3: the grid's best is 1, then 8 bisection rounds bring the search
    within 1/256 of a decade of the peak."""
    tried = []

    def score(c: float) -> tuple[float, float]:
        tried.append(c)
        return -abs(math.log10(c) - 0.3), 0.0

    best = log_search(score)
    assert abs(math.log10(best) - 0.3) <= 1 / 256
    assert tried[:len(LOG_GRID)] == list(LOG_GRID) and len(tried) == len(set(tried)) <= len(LOG_GRID) + 2 * 8
    # at the edge of the grid the search goes on beyond it
    assert log_search(lambda c: (-c, 0.0)) < min(LOG_GRID)


def _noisy_classes(generator: torch.Generator, n: int, flip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Three noisy classes in 6 of the 32 dimensions; a fraction ``flip`` of the labels redrawn at random."""
    centers = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    labels = torch.arange(n) % 3
    features = centers[labels] + torch.randn(n, 6, generator=generator)
    noisy = torch.rand(n, generator=generator) < flip
    return F.pad(features, (0, 26)), torch.where(noisy, torch.randint(0, 3, (n,), generator=generator), labels)


def test_the_probe_chooses_the_validation_best_c(tiny_backbone):
    """Label noise in training: the weakest penalty fits the training split best, a moderate one
    scores best on the clean validation split; the probe records the validation's choice."""
    generator = torch.Generator().manual_seed(0)
    train, val = _noisy_classes(generator, 30, 0.3), _noisy_classes(generator, 60, 0.0)
    model = LinearProbe(tiny_backbone, 3)
    chosen = model.fit(LabelledFeatures(train[0][None], train[1]), LabelledFeatures(val[0][None], val[1]))["C"]

    def score(c: float, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        weight, bias = logistic_regression(F.normalize(train[0], dim=-1), train[1], c, 3)
        return validation_score(F.normalize(x, dim=-1) @ weight.T + bias, y)

    grid_val = {c: score(c, *val) for c in LOG_GRID}
    val_best = max(grid_val, key=grid_val.get)
    assert max(LOG_GRID, key=lambda c: score(c, *train)) == 1e6 != val_best
    assert score(chosen, *val) >= grid_val[val_best] and val_best / 10 <= chosen <= val_best * 10
    with torch.no_grad():  # the model predicts with the fit of the chosen C
        logits = model.classify(val[0])
    assert validation_score(logits, val[1]) == pytest.approx(score(chosen, *val))


def test_clip_adapter_with_ratio_zero_is_the_frozen_feature(tiny_backbone):
    model = CLIPAdapter(tiny_backbone, 8, ratio=0.2)
    features = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.adapt(features, 0.0), features)
        assert torch.equal(model.adapt(features, 1.0), model.adapter(features))
        assert torch.allclose(model.adapt(features, 0.25), 0.25 * model.adapter(features) + 0.75 * features)
        model.eval().ratio.fill_(0.0)  # predictions use the chosen ratio: 0 is the text classifier alone
        assert torch.equal(model.classify(features), model.classifier(features))
        assert not torch.equal(model.train().classify(features), model.classifier(features))  # trains at 0.2


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_context_changes_the_text_features_and_has_the_right_shapes(tiny_backbone, class_specific):
    clip = tiny_backbone.model
    model = CoOp(tiny_backbone, MIKELS8.classes, context_tokens=4, class_specific=class_specific)
    width = clip.token_embedding.weight.shape[1]
    assert model.context.shape == ((8, 4, width) if class_specific else (4, width))
    prompts = [f"X X X X {name}." for name in MIKELS8.classes]
    with torch.no_grad():
        # the context set to the embedding of "X" gives exactly the text tower's features of the written prompts
        x = clip.token_embedding(tiny_backbone.tokenizer(["X"]))[0, 1]
        model.context.copy_(x.expand_as(model.context))
        written = clip.encode_text(tiny_backbone.tokenizer(prompts))
        assert model.class_features().shape == (8, 32)
        # the tower runs up to the longest prompt's end token only: with its causal mask, the same features
        assert model.tokens.shape[1] == int(tiny_backbone.tokenizer(prompts).argmax(dim=-1).max()) + 1 < 77
        assert torch.allclose(model.class_features(), written, atol=1e-5)
        assert model.classify(torch.randn(3, 32)).shape == (3, 8)
        before = model.class_features()
        model.context[0] += 1.0  # the first context vector (shared), or the first class's context
        changed = (model.class_features() != before).any(dim=1)
    assert changed.tolist() == ([True] + [False] * 7 if class_specific else [True] * 8)


# Every baseline, with a short schedule for those trained by gradient steps.
BASELINES = {"linear_probe": [], "clap_probe": [], "tip_adapter": [],
             "tip_adapter_f": ["train.phases=[{epochs: 3, train: [classifier]}]"],
             "clip_adapter": ["train.phases=[{epochs: 3, train: [stage_adapters]}]"],
             "coop": ["train.phases=[{epochs: 3, train: [prompts]}]"]}
SHORT = ["data.synthetic.per_class=10", "data.split_ratios=[0.5,0.25,0.25]", "text.steps=20", "train.log_with=[]"]


def _permuted_copy(splits: Path, out: Path) -> Path:
    """The split lists with the test labels permuted (each test image takes the next one's label)."""
    shutil.copytree(splits, out)
    with open(out / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [r["label"] for r in rows]
    for row, label in zip(rows, labels[1:] + labels[:1]):
        row["label"] = label
    with open(out / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_permuted_test_labels_change_no_choice(tmp_path, cache_dir):
    """Every baseline trained twice on the same splits, once with the test labels permuted: the same
    choices on validation (C, penalty, α, β, ratio), the same selected epoch and checkpoint, other
    test scores. The runs load back and evaluate to the test scores of their summaries."""
    cfg = load_config([TINY_CONFIG], [*SHORT, f"cache_dir={cache_dir}"])
    save_run_splits(tmp_path / "same", load_splits(cfg.data, cfg.seed, cache_dir))
    splits = {"same": tmp_path / "same", "permuted": _permuted_copy(tmp_path / "same", tmp_path / "permuted")}
    chosen = {}
    for method, overrides in BASELINES.items():
        runs = {}
        for kind, folder in splits.items():
            out = tmp_path / method / kind
            summary = train_run(load_config([TINY_CONFIG, ROOT / "configs" / "methods" / f"{method}.yaml"],
                                            [*SHORT, f"cache_dir={cache_dir}", f"data.splits_dir={folder}",
                                             *overrides]), out, progress=False)
            runs[kind] = (summary, load_checkpoint(out / "model.safetensors"))
        (same, same_weights), (permuted, permuted_weights) = runs["same"], runs["permuted"]
        assert same.get("selection") == permuted.get("selection"), method
        assert same.get("best_epoch") == permuted.get("best_epoch"), method
        assert same_weights.keys() == permuted_weights.keys(), method
        assert all(torch.equal(same_weights[n], permuted_weights[n]) for n in same_weights), method
        assert same["val"] == permuted["val"], method
        assert same["test"]["confusion_matrix"] != permuted["test"]["confusion_matrix"], method
        loaded = hclafter.load_run(tmp_path / method / "same").evaluate("test", progress=False)
        assert loaded["accuracy"] == same["test"]["accuracy"], method
        chosen[method] = {**same.get("selection", {}), "epoch": same.get("best_epoch")}
    assert set(chosen["linear_probe"]) == {"C", "epoch"} and chosen["linear_probe"]["epoch"] is None
    assert set(chosen["clap_probe"]) == {"penalty", "epoch"} and set(chosen["clip_adapter"]) == {"ratio", "epoch"}
    assert set(chosen["tip_adapter_f"]) == {"train_alpha", "train_beta", "alpha", "beta", "epoch"}
    assert chosen["coop"]["epoch"] >= 1


def test_coop_needs_the_class_names(tiny_backbone):
    with pytest.raises(ValueError, match="coop writes a prompt per class: it needs the 8 class names"):
        build_model(tiny_backbone, 8, ModelConfig(method="coop"))


def test_a_baseline_that_fits_on_cached_features_needs_the_cache():
    cfg = load_config([TINY_CONFIG, ROOT / "configs" / "methods" / "tip_adapter_f.yaml"], ["train.feature_cache=false"])
    with pytest.raises(ConfigError, match="model.method=tip_adapter_f fits on the frozen tower's cached features"):
        check_config(cfg)
    assert cache_applies(load_config([TINY_CONFIG, ROOT / "configs" / "methods" / "coop.yaml"]))  # its prompts: text
