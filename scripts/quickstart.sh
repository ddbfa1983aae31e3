#!/usr/bin/env bash
# Fresh clone to an answer: install, build the tiny built-in model on first use, ask it about an image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/epd-serve generate --image docs/assets/example.png \
  --prompt "What is in this picture?" --max-tokens 32 "$@"
