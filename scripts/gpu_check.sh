#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): CUDA tests, an NCCL launch on the visible GPUs (CUDA_VISIBLE_DEVICES),
# throughput, MFU, memory, FreezeOut step times and loader figures, in OUTDIR/gpu_check.{json,md}.
#   bash scripts/gpu_check.sh OUTDIR [--dry] [--full]
# Uses .venv when it exists, else the machine's python3 (GPU images bring their own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec "$PY" bench/gpu_check.py "$@"
