#!/usr/bin/env bash
# One-GPU check of Physarum (issue 15, item 5): ONE process, no Ray, no Redis. Prints one
# table comparing, in the same run, embedded-engine decode tokens/s against transformers'
# generate (bf16 and blockwise FP8), a torch-backend GRPO train step in bf16, and one weight
# sync from trainer to engine. Runs in a few minutes on one GPU (budget: under 8).
#
# Needs: python >= 3.10 with torch (a CUDA build) and transformers >= 4.57. Missing small
# pure-python dependencies of our library (pydantic, pyyaml, safetensors, numpy; accelerate
# for transformers' FP8 loader) are pip-installed with a message; pass --no-install to forbid.
#
#   scripts/gpu_check.sh                                   # GPU: --device cuda --size small
#   PYTHON=.venv/bin/python scripts/gpu_check.sh --device cpu --size tiny   # CPU smoke run
#
# Every other argument goes to bench/gpu_check.py (see --help). Exit status: 0 = every row
# measured, 1 = some row FAILED (its traceback is printed, the table still is), 2 = the
# machine lacks something (the message says what), 124 = the 8-minute limit was hit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: no '$PYTHON' on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout --signal=INT 480 "$PYTHON" bench/gpu_check.py "$@"
