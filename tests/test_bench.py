import math

import pytest

from hclafter.apps.bench import compile_rates, epoch_rates, run_bench

from .conftest import TINY_CFG, tiny_tower_flops

# LaFTer's forward in the bench (two prompt tokens): the tower by hand and the 8-class head on the
# D-dimensional feature. FLOPs are counted, not timed: exact on any machine and in any precision.
LAFTER_FLOPS = tiny_tower_flops(prompts=2) + 2 * TINY_CFG["embed_dim"] * 8

RATIOS = ("eval_flops_ratio", "eval_time_ratio", "eval_time_ratio_from_parts", "train_step_ratio",
          "train_step_ratio_from_parts", "train_memory_ratio", "fp32_utilisation", "bf16_utilisation",
          "bf16_over_fp32_throughput", "cache_speedup", "cascadeclip_over_hybrid_time",
          "cascadeclip_over_hybrid_time_from_parts", "cascadeclip_over_hybrid_flops", "pipeline_images_per_s",
          "jpeg_images_per_s_per_core", "store_build_images_per_s", "store_train_images_per_s_per_core",
          "store_eval_images_per_s_per_core", "store_over_jpeg_per_core")


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
    assert set(out["timing_noise"]) == {"eval", "train_step", "cache", "cascadeclip"}
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
