#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest --durations=15 "$@"
