#!/usr/bin/env bash
# CPU benchmark (3 minutes on a quiet 2-core host before the run-step-vs-bare-PyTorch row, which adds twelve
# ViT-B-32 training steps; far longer while others share it): every ratio of the performance targets, the image
# store's and bf16's rates and the CPU's bf16 units (cpu_bf16_units), as JSON.
#   benchmarks/cpu_bench.sh > cpu_bench.json
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup >&2
lscpu | grep "Model name" >&2
.venv/bin/hclafter bench --device cpu --batch 32 --prompts 50 --repeats 5 --json
