"""The per-layer feature cache: used only when the encoder is fixed, shared, and result-preserving."""
import json

import numpy as np
import pytest

from hclafter.core.config import load_config
from hclafter.models import HybridCascadeLaFTer, cache_applies, phase_reads_features
from hclafter.engine.run import train_run

from .conftest import TINY_CONFIG

FROZEN = ["model.prompt_tokens=0", "data.synthetic.per_class=8", "text.steps=30",
          "train.phases=[{epochs: 1, train: [stage_adapters, fusion]}, {epochs: 1, train: [stage_adapters, nga, classifier]}]"]


def test_cache_applies_only_when_the_image_tower_is_fixed():
    assert cache_applies(load_config([TINY_CONFIG], FROZEN))
    assert not cache_applies(load_config([TINY_CONFIG], FROZEN + ["model.prompt_tokens=4"]))
    assert not cache_applies(load_config([TINY_CONFIG], FROZEN + ["train.phases=[{epochs: 1, train: [layernorms]}]"]))
    assert not cache_applies(load_config([TINY_CONFIG], FROZEN + ["train.supervision=pseudo", "train.loss.name=ce"]))
    assert not cache_applies(load_config([TINY_CONFIG], FROZEN + ["train.feature_cache=false"]))


def test_cached_runs_match_uncached_ones_and_share_the_cache(tmp_path, cache_dir):
    cfg = lambda *more: load_config([TINY_CONFIG], [*FROZEN, f"cache_dir={tmp_path / 'cache'}", *more])
    plain = train_run(cfg("train.feature_cache=false"), tmp_path / "plain", progress=False)
    assert not (tmp_path / "cache" / "features").exists()
    cached = train_run(cfg(), tmp_path / "cached", progress=False)
    files = sorted((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(files) == 1  # all images of the dataset, whatever the split
    assert np.load(files[0], mmap_mode="r")["features"].shape[1:] == (8, 64)  # layers 5..12, joint dim 64
    for split in ("val", "test"):
        # the cache encodes the images in other batches than training does, so the features may differ
        # in the last bits: argmax counts stay exact (no near-tie), LDL metrics to float32 rounding
        for key in ("accuracy", "macro_f1", "confusion_matrix", "stage_accuracy"):
            assert cached[split][key] == plain[split][key]
        for key, value in plain[split]["ldl"].items():
            assert cached[split]["ldl"][key] == pytest.approx(value, abs=1e-6)
    stamps = [f.stat().st_mtime_ns for f in files]
    # another seed of a sweep splits the images differently but reuses the same feature file
    train_run(cfg("seed=1"), tmp_path / "again", progress=False)
    assert sorted((tmp_path / "cache" / "features").glob("*.npy")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


PROMPTED = ["data.synthetic.per_class=8", "text.steps=30",
            "train.phases=[{epochs: 2, train: [stage_adapters, fusion]}, {epochs: 1, train: [stage_adapters, prompts]}]"]


def test_a_phase_that_leaves_the_tower_fixed_reads_each_image_once():
    cfg = load_config([TINY_CONFIG], PROMPTED)
    assert phase_reads_features(cfg, {"stage_adapters", "fusion", "nga", "classifier"})
    assert not phase_reads_features(cfg, {"stage_adapters", "prompts"})
    assert not phase_reads_features(cfg, {"layernorms"})
    assert not phase_reads_features(load_config([TINY_CONFIG], PROMPTED + ["data.train_augment=crop_flip"]), {"fusion"})
    assert not phase_reads_features(load_config([TINY_CONFIG], PROMPTED + ["train.feature_cache=false"]), {"fusion"})
    assert not phase_reads_features(load_config([TINY_CONFIG], PROMPTED + ["model.method=cascadeclip"]), {"decoders"})
    # CoOp's prompts are in the text tower: its image features stay fixed while they train
    assert phase_reads_features(load_config([TINY_CONFIG], PROMPTED + ["model.method=coop"]), {"prompts"})


def test_a_prompted_run_encoding_its_first_phase_once_matches_one_running_the_tower_each_step(tmp_path, cache_dir,
                                                                                              monkeypatch):
    """Phase 1 trains the adapters and fusion only, with 8 visual prompts at their initial values: its
    steps and validations read each image's features encoded once, and the run ends as one that runs
    the tower at every step (``train.feature_cache=false``) does."""
    calls = []
    encode = HybridCascadeLaFTer.forward_features
    monkeypatch.setattr(HybridCascadeLaFTer, "forward_features", lambda self, x: calls.append(len(x)) or encode(self, x))
    runs = {}
    for name, cache in (("plain", "false"), ("encoded", "true")):
        calls.clear()
        runs[name] = train_run(load_config([TINY_CONFIG], [*PROMPTED, f"train.feature_cache={cache}"]),
                               tmp_path / name, progress=False)
        runs[name]["images_encoded"] = sum(calls)
    plain, encoded = runs["plain"], runs["encoded"]
    n = plain["num_samples"]
    # phase 1 ran the tower over train and val twice each (2 passes, 2 validations) against once when encoded
    assert plain["images_encoded"] - encoded["images_encoded"] == n["train"] + n["val"]
    assert encoded["best_step"] == plain["best_step"]
    curves = [[json.loads(line)["val_accuracy"] for line in (tmp_path / name / "metrics.jsonl").open()]
              for name in runs]
    assert curves[0] == curves[1]
    for split in ("val", "test"):
        for key in ("accuracy", "macro_f1", "confusion_matrix", "stage_accuracy"):
            assert encoded[split][key] == plain[split][key]
        for key, value in plain[split]["ldl"].items():
            assert encoded[split]["ldl"][key] == pytest.approx(value, abs=1e-5)
