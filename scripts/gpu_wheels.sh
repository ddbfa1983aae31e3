#!/usr/bin/env bash
# Fill a wheel folder for scripts/gpu_check.sh on a machine with network access, for the GPU machine's
# Python (default 3.12, x86_64 Linux): the packages EPD-Serve needs beyond torch and transformers.
#   bash scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION]
set -euo pipefail
DIR=${1:-wheels}
PYV=${2:-3.12}
python3 -m pip download --quiet --dest "$DIR" --only-binary=:all: --python-version "$PYV" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  pyzmq msgspec structlog prometheus-client openai pytest pytest-asyncio pyyaml
echo "wheels in $DIR: $(ls "$DIR" | wc -l) files"
