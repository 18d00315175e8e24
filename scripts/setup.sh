#!/usr/bin/env bash
# Create .venv (once) and install the project into it. `--test` adds the test tools.
# torch is installed first and pinned, so pip takes the CPU wheel and not a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[test,bench]"
else
    .venv/bin/python -m pip install -q -e .
fi
