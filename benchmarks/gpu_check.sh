#!/usr/bin/env bash
# GPU check (under 8 minutes): HybridCascade-LaFTer vs LaFTer vs Cascade-CLIP on ViT-B-32 with 50
# prompts, bf16 autocast, batch 256 — training and inference images/s, the ratios of `hclafter bench`,
# and model FLOP utilisation against this GPU's measured bf16 matrix-product rate.
#
#   benchmarks/gpu_check.sh [WHEEL_DIR] > gpu_check.json
#
# Works without network access: Python packages missing on the machine are installed from
# WHEEL_DIR (default .whl; fill it elsewhere with `pip download --no-deps open_clip_torch omegaconf
# antlr4-python3-runtime ftfy wcwidth`), never downloaded. The project itself runs from src/.
set -euo pipefail
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
python3 -m hclafter bench --device cuda --batch 256 --prompts 50 --repeats "${REPEATS:-10}" --precision bf16 --json
