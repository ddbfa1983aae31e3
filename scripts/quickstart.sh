#!/usr/bin/env bash
# Fresh clone to a streamed answer: install, bring up the disaggregated stack (gateway + Encode,
# Prefill, Decode processes) on a tiny model built offline, and stream an answer about an image.
# The stack keeps running afterwards; Ctrl-C stops every process. Extra arguments go to `epd-serve up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT=${PORT:-8000}
LOG=$(mktemp -t epd-serve-up.XXXXXX.log)
.venv/bin/epd-serve up --port "$PORT" "$@" >"$LOG" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null' INT TERM EXIT
echo "==> starting the stack (log: $LOG)"
for _ in $(seq 1 600); do
  grep -q "EPD-Serve is up" "$LOG" && break
  kill -0 $UP 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
grep -A4 "EPD-Serve is up" "$LOG"
echo "==> asking: What is in this picture? (docs/assets/example.png)"
.venv/bin/epd-serve ask --url "http://127.0.0.1:$PORT/v1" --image docs/assets/example.png "What is in this picture?"
echo "==> the stack is still up on http://127.0.0.1:$PORT/v1; Ctrl-C stops it"
wait $UP
