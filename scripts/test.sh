#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# two workers (CI has two cores); each test file runs whole on one worker: its module-scoped stacks
# are started once, and the conformance tests run in file order on one stack
.venv/bin/python -m pytest -n "${EPD_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
