#!/usr/bin/env bash
# Create the virtual environment the EasyDeL peer of bench/model.py runs in (once; rerunning only checks it).
#
#     bench/setup_easydel.sh [VENV]      # default: $HOME/.cache/gemma3-bench/easydel-venv
#
# EasyDeL pins its own jax and transformers, so it cannot share .venv. torch and pillow are imported by
# EasyDeL without being declared; torch is installed first and pinned, so pip takes the CPU wheel and not a
# multi-GB CUDA build. Prints the venv's python (pass it to bench/model.py --easydel-python if not the default).
set -euo pipefail
VENV=${1:-$HOME/.cache/gemma3-bench/easydel-venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || { mkdir -p "$(dirname "$VENV")" && "$PY" -m venv "$VENV"; }
if ! "$VENV/bin/python" -c 'import easydel, PIL, torch; assert easydel.__version__ == "0.3.0"' 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q "easydel==0.3.0" pillow
    "$VENV/bin/python" -c 'import easydel, PIL, torch; assert easydel.__version__ == "0.3.0"' >&2
fi
echo "$VENV/bin/python"
