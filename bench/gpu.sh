#!/usr/bin/env bash
# The GPU benchmark, for a lent H200 (the `device` tool): at most 5 minutes, never part of CI.
# It uses the machine's own python3 (JAX with CUDA is installed there) and this checkout's gemma3/.
#   bash bench/gpu.sh              # gemma-3-4b shapes: batches 1/32/128, the LM worker's engine, the sharded path;
#                                  # then our logits on the GPU against transformers (bench/gpu_numerics.py)
# Extra arguments go to bench/gpu.py. Writes $OUT/gpu-last.md (or /tmp/...), the raw numbers beside it
# (gpu-last.json) and gpu-numerics.md. GPU_BENCH_SECONDS / GPU_NUMERICS_SECONDS bound the two parts.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
bench_s="${GPU_BENCH_SECONDS:-235}"
timeout "$bench_s" python3 bench/gpu.py --json "$out/gpu-last.json" --budget-s $((bench_s - 60)) "$@" \
    | tee "$out/gpu-last.md" || echo "bench/gpu.py ended with status $?"
timeout "${GPU_NUMERICS_SECONDS:-60}" python3 bench/gpu_numerics.py \
    --checkpoints "${GEMMA3_NUMERICS_CHECKPOINTS:-/tmp/gemma3-numerics-checkpoints}" \
    | tee "$out/gpu-numerics.md" || echo "bench/gpu_numerics.py ended with status $?"
