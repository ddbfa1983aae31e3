#!/usr/bin/env bash
# Create .venv and install EPD-Serve with its test extras. Safe to run again: it only installs what
# is missing. torch is pinned and installed first, so that pip never pulls the CUDA builds on a
# CPU-only machine (set EPD_TORCH_SPEC to install another build, e.g. on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${EPD_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "==> installing $TORCH_SPEC"
  .venv/bin/pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
fi
# Mooncake's CPU build needs the RDMA verbs library even for its TCP transport (Debian: libibverbs1).
# Without it (no root, no apt) the mooncake tests are skipped with that reason; nothing else needs it.
if ! ldconfig -p 2>/dev/null | grep -q "libibverbs.so.1 " && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  echo "==> installing libibverbs1 (for the mooncake data plane)"
  apt-get install -y -q libibverbs1 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libibverbs1 >/dev/null 2>&1; } \
    || echo "    could not install libibverbs1: the mooncake tests will be skipped"
fi
if ! .venv/bin/python -c "import cli.main, pytest, openai" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.epd-installed ]; then
  echo "==> installing epd-serve (editable) with the test, bench, mooncake and nixl extras"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,bench,mooncake,nixl]"
  touch .venv/.epd-installed
fi
