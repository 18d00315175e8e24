#!/usr/bin/env bash
# Newcomer's first command: install, then generate with a small checkpoint the project makes itself.
# (Until the trained demo model and the services land, this shows the model library end to end:
# write a Hugging Face-layout checkpoint, load it back through the real loader, generate.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gemma3-generate --checkpoint .cache/tiny-random --init-random --prompt-ids 2,17,42,99 \
    --max-new-tokens 16 "$@"
