#!/usr/bin/env bash
# GPU check: what issues 17 and 23 ask a CUDA machine to measure, in one run. Expected on an H100: bench about 2
# minutes, epoch about 1.5, compile 4-6 (inductor compiles two models twice, then a run's step and the bare step);
# each part is bounded (5, 4 and 8 minutes) and PARTS="bench epoch" leaves out the compile part.
#   1. bench:   HybridCascade-LaFTer vs LaFTer vs Cascade-CLIP on ViT-B-32 with 50 prompts, batch 256, bf16
#               (autocast over the tower's frozen weights kept in bf16): training step and inference, direct
#               and from parts; inference MFU in bf16 against this GPU's measured 8192² bf16 matmul rate;
#               bf16 / fp32 inference throughput; a run's training step against a bare PyTorch step of the
#               same tower, prompts and batch (`hclafter bench`).
#   2. epoch:   end to end, data included, at 224 px: training images/s over 8192 synthetic 640x480 JPEGs,
#               decoded in every epoch (all CPU cores) vs read from the image store (`hclafter bench --epoch`).
#   3. compile: both models' training step and inference under torch.compile (inductor), with compile times;
#               the run's step against the bare step, both compiled.
# Prints one JSON object: the three parts and the issue's targets with met/not met. Each part is also written
# to $RESULTS (default: $OUT when set, else benchmarks/results/gpu-<date>), so a part that fails or runs out of
# time leaves the others.
#
#   benchmarks/gpu_check.sh [WHEEL_DIR] > gpu_check.json
#
# Works without network access: Python packages missing on the machine are installed from
# WHEEL_DIR (default .whl; fill it elsewhere with `pip download --no-deps open_clip_torch omegaconf
# antlr4-python3-runtime ftfy wcwidth`), never downloaded. The project itself runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
missing=$(python3 - <<'PY'
import importlib.util
print(" ".join(m for m in ("open_clip", "omegaconf", "accelerate", "safetensors", "sklearn", "matplotlib", "tqdm")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing from $wheels for: $missing" >&2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/hclafter-site "$wheels"/*.whl >&2
  export PYTHONPATH="/tmp/hclafter-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
results="${RESULTS:-${OUT:-benchmarks/results/gpu-$(date +%F)}}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
nproc >&2

part() {  # name, seconds, command...: run one part, its JSON into $results/<name>.json
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)" >&2
  local start=$SECONDS
  if timeout "$limit" "$@" > "$results/$name.json.tmp" 2> "$results/$name.log"; then
    mv "$results/$name.json.tmp" "$results/$name.json"
  else
    echo "$name failed or timed out (rc $?); see $results/$name.log" >&2
    tail -5 "$results/$name.log" >&2
  fi
  echo "   $name: $((SECONDS - start))s" >&2
}

parts="${PARTS:-bench epoch compile}"
[[ " $parts " == *" bench "* ]] && part bench 300 python3 -m hclafter bench --device cuda --batch 256 --prompts 50 \
  --repeats "${REPEATS:-6}" --precision bf16 --json
[[ " $parts " == *" epoch "* ]] && part epoch 240 python3 -m hclafter bench --device cuda --batch 256 --prompts 50 \
  --precision bf16 --epoch "${EPOCH_IMAGES:-8192}" --json
[[ " $parts " == *" compile "* ]] && part compile 480 python3 -m hclafter bench --device cuda --batch 256 \
  --prompts 50 --repeats "${REPEATS:-6}" --precision bf16 --compile inductor --json

python3 - "$results" <<'PY'
import json
import sys
from pathlib import Path

parts = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
bench = parts.get("bench", {})


def target(value, limit, at_least=False):
    if value is None:
        return {"value": None, "target": limit, "met": None}
    return {"value": value, "target": limit, "met": value >= limit if at_least else value <= limit}


compiled = parts.get("compile", {})
mfu_compiled = None
if compiled and bench:
    mfu_compiled = (compiled["eval_images_per_s"]["hybrid"] * bench["gflops_per_image"]["hybrid"]
                    / bench["bf16_matmul_gflops"])
parts["targets"] = {
    "train_step_vs_lafter_from_parts": target(bench.get("train_step_ratio_from_parts"), 1.03),
    "train_step_vs_lafter_direct": target(bench.get("train_step_ratio"), 1.03),
    "inference_vs_lafter_from_parts": target(bench.get("eval_time_ratio_from_parts"), 1.02),
    "inference_vs_lafter_direct": target(bench.get("eval_time_ratio"), 1.02),
    "inference_mfu_bf16": target(bench.get("bf16_utilisation"), 0.40, at_least=True),
    "inference_mfu_bf16_compiled": target(mfu_compiled, 0.40, at_least=True),
    "compiled_train_step_vs_lafter": target(compiled.get("train_ratio"), 1.03),
    "compiled_inference_vs_lafter": target(compiled.get("eval_ratio"), 1.02),
    "train_step_vs_bare_pytorch": target(bench.get("train_step_vs_bare"), 1.10),
    "compiled_train_step_vs_bare_pytorch": target(compiled.get("train_vs_bare"), 1.10),
}
print(json.dumps(parts, indent=2))
PY
