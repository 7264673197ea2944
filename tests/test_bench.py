import math

from hclafter.bench import run_bench

from .conftest import TINY_CFG

RATIOS = ("eval_flops_ratio", "eval_time_ratio", "eval_time_ratio_from_parts", "train_step_ratio",
          "train_step_ratio_from_parts", "train_memory_ratio", "fp32_utilisation", "bf16_utilisation",
          "bf16_over_fp32_throughput", "cache_speedup", "cascadeclip_over_hybrid_time",
          "cascadeclip_over_hybrid_time_from_parts", "cascadeclip_over_hybrid_flops", "pipeline_images_per_s")


def test_bench_reports_every_ratio():
    out = run_bench(batch=2, prompts=2, repeats=2, name="tiny", model_cfg=TINY_CFG)
    for key in RATIOS:
        assert math.isfinite(out[key]) and out[key] > 0, key
    flops = out["gflops_per_image"]
    assert out["eval_flops_ratio"] == flops["hybrid"] / flops["lafter"] > 1  # the head adds a little
    # three stages' head against one
    assert out["eval_time_ratio_from_parts"] > 1 and out["train_step_ratio_from_parts"] > 1
    assert out["train_memory_ratio"] > 1  # the hybrid keeps 8 layers' CLS tokens for backward
    assert set(out["timing_noise"]) == {"eval", "train_step", "cache", "cascadeclip"}
