#!/usr/bin/env bash
# The test command: set up .venv with the test extras, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
# Two pytest processes (pytest-xdist; GEMMA3_TEST_WORKERS sets how many, 0 runs the tests in this one): most
# tests wait on worker processes, gRPC and XLA compiles, and two processes overlap those waits even on two
# cores (on a 2-core Zen 4: 13 minutes against 17-18 in one).
exec .venv/bin/python -m pytest -n "${GEMMA3_TEST_WORKERS:-2}" "$@"
