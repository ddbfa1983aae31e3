"""CPU linear layers packed for oneDNN against torch's `F.linear`, side by side: whole decode steps of the
engine and whole encoder calls, each model loaded three ways in one process (`F.linear`; packed with
each MLP activation apart; packed with it fused, the default: services/models/fused_activation.py)
and timed in alternating rounds (a drift of the machine's speed hits all alike).

    python -m bench.packed_linear [--model DIR] [--batch 1,2,8,16] [--context 128] [--threads 1,2]

Printed per thread count: the mean decode step at each batch (sequences with `--context`-token prompts,
growing while they are timed) and one 224x224 image through the vision tower, for `--linear-backend
torch`, `onednn` with activations apart and `onednn` (fused), with torch / onednn (above 1: packing
is faster) and apart / fused (above 1: fusing is faster). The greedy tokens of the two are
compared too: how many sequences got the same tokens from both (the oracle tests hold each to
transformers; a random-weight model can have near-ties that float summation order tips).
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

ROUNDS = 3
MODES = ("torch", "apart", "onednn")  # F.linear; packed, activations apart; packed and fused


def decode_steps(models: dict, batch: int, context: int, steps: int) -> dict:
    from bench.decode_breakdown import engine_at_batch, mean_step_seconds

    args = types.SimpleNamespace(batch=batch, context=context, steps=steps)
    engines = {m: engine_at_batch(models[m], args) for m in MODES}
    best = dict.fromkeys(MODES, float("inf"))
    for _ in range(ROUNDS):
        for m in MODES:
            best[m] = min(best[m], mean_step_seconds(engines[m], steps // ROUNDS) * 1e3)
    tokens = {m: [s.token_ids for s in engines[m].scheduler.requests.values()] for m in MODES}
    same = sum(a == b == c for a, b, c in zip(*(tokens[m] for m in MODES), strict=True))
    return {**best, "same_tokens": f"{same}/{batch}"}


def encoder_call(models: dict, repeats: int) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    items = {m: [models[m].family.preprocess(image)] for m in MODES}
    for m in MODES:
        models[m].family.encode(items[m])  # warm-up
    best = dict.fromkeys(MODES, float("inf"))
    for _ in range(ROUNDS):
        for m in MODES:
            start = time.perf_counter()
            for _ in range(repeats):
                models[m].family.encode(items[m])
            best[m] = min(best[m], (time.perf_counter() - start) / repeats * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packed_linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the built-in small Qwen2-VL)")
    p.add_argument("--batch", default="1,2,8,16", help="decode batch sizes, comma-separated (1,2,8,16)")
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each sequence (128)")
    p.add_argument("--steps", type=int, default=60, help="timed decode steps per backend and batch (60)")
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (1,2)")
    p.add_argument("--encoder-repeats", type=int, default=10, help="timed encoder calls per round (10)")
    p.add_argument("--output", help="write the figures as JSON here")
    args = p.parse_args(argv)

    import torch

    from services.models.loader import load_model
    from services.models.packed_linear import pack_linears
    from services.models.tiny import ensure_tiny_model

    path = args.model or str(ensure_tiny_model("qwen2_vl", "small"))
    models = {m: load_model(path, linear_backend=m) for m in ("torch", "onednn")}
    models["apart"] = load_model(path, linear_backend="torch")
    pack_linears(models["apart"].family.model, "onednn", fuse=False)
    report: dict = {"benchmark": "bench.packed_linear", "model": Path(path).name, "runs": []}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(
            f"{threads} thread(s)           torch ms    apart ms   onednn ms   torch / onednn   apart / fused"
        )
        for batch in (int(b) for b in args.batch.split(",")):
            t = decode_steps(models, batch, args.context, args.steps)
            report["runs"].append({"threads": threads, "what": f"decode step, batch {batch}", **t})
            print(f"  decode step, batch {batch:<3} {_row(t)}   same tokens {t['same_tokens']}")
        t = encoder_call(models, args.encoder_repeats)
        report["runs"].append({"threads": threads, "what": "encoder, one 224x224 image", **t})
        print(f"  encoder, 224x224 image {_row(t)}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


def _row(t: dict) -> str:
    return (f"{t['torch']:8.2f} {t['apart']:11.2f} {t['onednn']:11.2f} {t['torch'] / t['onednn']:14.2f}x"
            f" {t['apart'] / t['onednn']:14.2f}x")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
