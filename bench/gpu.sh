#!/usr/bin/env bash
# The GPU benchmark, for a lent H200 (the `device` tool): at most 5 minutes, never part of CI.
# It uses the machine's own python3 (JAX with CUDA is installed there) and this checkout's gemma3/.
#   bash bench/gpu.sh              # gemma-3-4b shapes, batches 1/32/128, single device and sharded path
# Writes the Markdown table to $OUT/gpu-last.md (or /tmp/gpu-last.md) and the raw numbers beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 290 python3 bench/gpu.py --json "$out/gpu-last.json" "$@" | tee "$out/gpu-last.md"
