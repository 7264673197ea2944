import json
import math
from contextlib import nullcontext

import pytest
import torch

from hclafter.apps.bench import BareViT, bare_step, compile_rates, epoch_rates, run_bench, run_step
from hclafter.core.config import load_config

from .conftest import TINY_CFG, tiny_tower_flops

# LaFTer's forward in the bench (two prompt tokens): the tower by hand and the 8-class head on the
# D-dimensional feature. FLOPs are counted, not timed: exact on any machine and in any precision.
LAFTER_FLOPS = tiny_tower_flops(prompts=2) + 2 * TINY_CFG["embed_dim"] * 8
# What the bare step trains with two prompt tokens: the prompts, the tower's LayerNorms (ln_pre, two
# per block, ln_post: weight and bias each) and the 8-class linear head on the D-dimensional feature.
_W, _L, _D = TINY_CFG["vision_cfg"]["width"], TINY_CFG["vision_cfg"]["layers"], TINY_CFG["embed_dim"]
BARE_TRAINED = 2 * _W + (2 * _L + 2) * 2 * _W + (_D + 1) * 8

RATIOS = ("eval_flops_ratio", "eval_time_ratio", "eval_time_ratio_from_parts", "train_step_ratio",
          "train_step_ratio_from_parts", "train_memory_ratio", "fp32_utilisation", "bf16_utilisation",
          "bf16_over_fp32_throughput", "cache_speedup", "cascadeclip_over_hybrid_time",
          "cascadeclip_over_hybrid_time_from_parts", "cascadeclip_over_hybrid_flops", "pipeline_images_per_s",
          "jpeg_images_per_s_per_core", "store_build_images_per_s", "store_train_images_per_s_per_core",
          "store_eval_images_per_s_per_core", "store_over_jpeg_per_core", "train_step_vs_bare")


def test_bench_reports_every_ratio():
    out = run_bench(batch=2, prompts=2, repeats=2, name="tiny", model_cfg=TINY_CFG)
    for key in RATIOS:
        assert math.isfinite(out[key]) and out[key] > 0, key
    flops = out["gflops_per_image"]
    # a count that dropped the eval-mode fused attention, the prompts or the head misses this
    assert flops["lafter"] * 1e9 == pytest.approx(LAFTER_FLOPS, rel=1e-12)
    # the hybrid adds its head on 8 layers' CLS tokens: 0.6 % here, not a second tower
    assert 1 < out["eval_flops_ratio"] == flops["hybrid"] / flops["lafter"] < 1.01
    # three stages' head against one
    assert out["eval_time_ratio_from_parts"] > 1 and out["train_step_ratio_from_parts"] > 1
    assert out["train_memory_ratio"] > 1  # the hybrid keeps 8 layers' CLS tokens for backward
    assert set(out["timing_noise"]) == {"eval", "train_step", "cache", "cascadeclip", "vs_bare"}
    # the bare step trains the prompts, the tower's LayerNorms and its head; the run's step trains those
    # parameters of the tower and its own head besides, and computes everything the bare step does
    trained = out["train_step_vs_bare_trained_parameters"]
    assert trained["bare"] == BARE_TRAINED < trained["hybrid"]
    assert 1 < out["train_step_vs_bare"] < 4 and 1 < out["train_step_vs_bare_per_round"] < 4
    assert isinstance(out["cpu_bf16_units"], list)
    # A fraction of the matrix-product rate (tiny models: a small one) where the CPU has units for that
    # precision; without bf16 units the bf16 reference product takes a slow path the model's small
    # products do not, and the ratio says nothing about the model.
    for label in ("fp32", "bf16") if out["cpu_bf16_units"] else ("fp32",):
        assert 0 < out[f"{label}_utilisation"] < 2, label


def test_compiled_models_are_timed():
    out = compile_rates("eager", "cpu", batch=2, prompts=2, repeats=2, name="tiny", precision="fp32",
                        model_cfg=TINY_CFG)
    assert out["eval_ratio"] > 0 and out["train_ratio"] > 0 and out["train_compile_s"] > 0
    assert out["train_vs_bare"] > 0 and set(out["train_vs_bare_compile_s"]) == {"hybrid", "bare"}


def test_bare_step_runs_the_runs_tower_and_prompts_and_trains_them():
    cfg = load_config([], ["device=cpu", "backbone.name=tiny", "backbone.random_init=true", "model.prompt_tokens=2",
                           f"backbone.model_cfg={json.dumps(TINY_CFG)}"])
    torch.manual_seed(0)
    run, state, batch = run_step(cfg, 4)
    model = state.plain
    bare = BareViT(model.visual, model.prompts.tokens, 8)
    with torch.no_grad():  # the same tower and prompts, placed the same way: the run's final-layer feature
        torch.testing.assert_close(bare.features(batch["image"]), model.layer_features(batch["image"])[-1])
    before = {n: p.detach().clone() for n, p in bare.named_parameters()}
    bare_step(bare, batch["image"], batch["label"], nullcontext, lr=1e-2)()
    moved = {n for n, p in bare.named_parameters() if not torch.equal(p, before[n])}
    tower_trained = {f"visual.{n}" for n, p in model.visual.named_parameters() if p.requires_grad}
    assert "visual.ln_post.weight" in tower_trained and "visual.conv1.weight" not in tower_trained
    assert moved == {"prompts", "head.weight", "head.bias"} | tower_trained
    prompts = model.prompts.tokens.detach().clone()
    assert run()["n"] == 4 and not torch.equal(model.prompts.tokens, prompts)  # the run's step trains its prompts


def test_bf16_bench_runs_on_the_bf16_tower():
    out = run_bench(batch=2, prompts=2, repeats=2, name="tiny", model_cfg=TINY_CFG, precision="bf16")
    assert out["precision"] == "bf16" and out["fp32_images_per_s"] > 0
    assert out["gflops_per_image"]["lafter"] * 1e9 == pytest.approx(LAFTER_FLOPS, rel=1e-12)  # under autocast too
    assert math.isfinite(out["bf16_over_fp32_throughput"]) and math.isfinite(out["train_step_ratio_from_parts"])


def test_epoch_rates_train_from_files_and_from_the_store():
    out = epoch_rates("cpu", "fp32", batch=16, images=48, workers=0, prompts=2, name="tiny", model_cfg=TINY_CFG,
                      image_size=(40, 50))
    assert len(out["jpeg_images_per_s"]) == len(out["store_images_per_s"]) == 2
    assert out["store_build_s"] > 0 and out["store_over_jpeg"] > 0
