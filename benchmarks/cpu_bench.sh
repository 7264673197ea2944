#!/usr/bin/env bash
# CPU benchmark (about 5 minutes on 2 cores): every ratio of the performance targets, as JSON.
#   benchmarks/cpu_bench.sh > cpu_bench.json
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup >&2
lscpu | grep "Model name" >&2
.venv/bin/hclafter bench --device cpu --batch 32 --prompts 50 --repeats 5 --json
