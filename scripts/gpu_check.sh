#!/usr/bin/env bash
# One device check on a fresh NVIDIA machine that has torch and transformers installed (no network
# needed): fidelity on cuda (fp32 and bf16, every attention backend, decode CUDA graphs), cudaipc and
# torchdist between processes, E1 PD1, E1 P1 D1 (cudaipc and host staging) and EPD1 stacks on one GPU
# answering the openai client like transformers, bench-engine on the mid preset against transformers'
# generate, a batch-64 decode step against the memory roofline, the share of the KV hand-off hidden
# behind prefill (layer-wise over cudaipc), and the TTFT overhead of E1 P1 D1 against EPD1 at
# concurrency 1. Writes one JSON summary. Target: under 10 minutes on one H200.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          (default OUT_DIR: gpu-check)
#
# Python packages the machine lacks (pyzmq, msgspec, structlog, prometheus-client, openai, pytest,
# pytest-asyncio, ...) are installed from the wheel folder $EPD_WHEELS (default: wheels/), which
# scripts/gpu_wheels.sh fills on a machine with network access. Nothing is installed over the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WHEELS=${EPD_WHEELS:-wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EPD_SERVE_CACHE="$OUT/models"
T0=$(date +%s)
step() { echo; echo "==> [$(( $(date +%s) - T0 )) s] $*"; }
status=0
record() { # name, exit code
  echo "{\"check\": \"$1\", \"exit_code\": $2, \"seconds_since_start\": $(( $(date +%s) - T0 ))}" >> "$OUT/checks.jsonl"
  [ "$2" -eq 0 ] || status=1
}

step "environment"
"$PY" - <<'PYEOF' | tee "$OUT/environment.txt"
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PYEOF
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"zmq": "pyzmq", "msgspec": "msgspec", "structlog": "structlog", "prometheus_client": "prometheus-client",
        "openai": "openai", "pytest": "pytest", "pytest_asyncio": "pytest-asyncio", "aiohttp": "aiohttp",
        "safetensors": "safetensors", "tokenizers": "tokenizers", "PIL": "pillow", "tqdm": "tqdm", "yaml": "pyyaml"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "installing from $WHEELS: $missing"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $missing || { echo "missing packages: $missing"; exit 1; }
fi

step "checkpoints (tiny for tests, mid for the benchmarks)"
MID=$("$PY" -c "from services.models.tiny import ensure_tiny_model; print(ensure_tiny_model('qwen2_vl', 'mid'))" | tail -1)
echo "mid checkpoint: $MID"

step "fidelity on cuda: every backend, eager and graphs, fp32 and bf16"
"$PY" -m pytest tests/gpu -q -s -p no:cacheprovider 2>&1 | tee "$OUT/fidelity.txt"
record fidelity "${PIPESTATUS[0]}"

step "fidelity suite of the CPU tests, on this machine (the same code path with the sdpa reference)"
"$PY" -m pytest tests/services/engine -q -p no:cacheprovider -x 2>&1 | tail -3 | tee "$OUT/cpu_suite.txt"
record cpu_engine_suite "${PIPESTATUS[0]}"

step "bench-engine on the mid preset against transformers generate (bf16)"
"$PY" -m bench.engine --model "$MID" --device cuda --dtype bfloat16 --backends flex,sdpa \
  --num-requests 64 --max-in-flight 16 --repeats 1 --skip-sequential --output "$OUT/bench_engine.json" \
  2>&1 | tee "$OUT/bench_engine.txt"
record bench_engine "${PIPESTATUS[0]}"

step "decode step at batch 64 on the mid preset against the memory roofline (bf16)"
"$PY" -m bench.decode_roofline --model "$MID" --device cuda --batch 64 --context 512 \
  --output "$OUT/decode_roofline.json" 2>&1 | tee "$OUT/decode_roofline.txt"
record decode_roofline "${PIPESTATUS[0]}"

step "KV hand-off hidden behind prefill on the mid preset, layer by layer over cudaipc (bf16)"
"$PY" -m bench.kv_overlap --model "$MID" --device cuda --dataplane cudaipc --lengths 256,1024,4096 \
  --repeats 5 --output "$OUT/kv_overlap.json" 2>&1 | tee "$OUT/kv_overlap.txt"
record kv_overlap "${PIPESTATUS[0]}"

step "TTFT of E1 P1 D1 (cudaipc) against EPD1 at concurrency 1, paired (target: at most 5 ms more)"
"$PY" -m bench.overhead --device cuda --topologies "EPD1,E1 P1 D1" --num-requests 30 --threads 4 \
  --output "$OUT/overhead.json" 2>&1 | tee "$OUT/overhead.txt"
record overhead "${PIPESTATUS[0]}"

step "summary"
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"environment": (out / "environment.txt").read_text().strip().splitlines()}
summary["checks"] = [json.loads(line) for line in (out / "checks.jsonl").read_text().splitlines()]
for name in ("bench_engine", "decode_roofline", "kv_overlap", "overhead"):
    f = out / f"{name}.json"
    summary[name] = json.loads(f.read_text()) if f.exists() else None
summary["fidelity_lines"] = [l for l in (out / "fidelity.txt").read_text().splitlines()
                             if "cuda" in l or "passed" in l or "failed" in l]
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2)[:4000])
PYEOF
echo "==> done in $(( $(date +%s) - T0 )) s, status $status; results in $OUT"
exit $status
