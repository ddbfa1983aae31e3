"""CPU decode attention: the C kernel over the block pool (`cpu`) against gathered SDPA (`sdpa`).

Two views, both backends in one process, taking turns, best of `--repeats` rounds:
- one layer's decode attention call at the model's geometry (8 query heads over 2 KV heads, head dim 64
  for the small Qwen2-VL), over a shuffled pool, for each batch, with the time a plain copy of the same
  KV bytes takes on this machine as the memory roofline (reading the context once is the floor);
- whole engine decode steps (every layer, linears included) with `--batch` sequences of `--context`
  tokens, as `bench.decode_roofline` times them.

    python -m bench.cpu_attention --model DIR [--threads 1,2] [--batches 1,8,16,32,64] [--context 256]
"""

from __future__ import annotations

import argparse
import json
import time


def time_call(fn, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def attention_calls(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, repeats: int) -> dict:
    """Microseconds per decode layer call, sdpa against the kernel, and the copy roofline."""
    import torch

    from services.engine.attention import cpu_kernel
    from services.engine.attention.base import StepLayout
    from services.engine.attention.cpu_paged import CpuPagedBackend
    from services.engine.attention.sdpa import SdpaBackend
    from services.engine.kv_cache import KVCache, KVLayout

    bs = 16
    width = -(-context // bs)
    num_blocks = max(2 * batch * width, 1024)
    kv = KVCache(KVLayout(1, kv_heads, head_dim, torch.float32), num_blocks, bs)
    kv.pool.normal_()
    gen = torch.Generator().manual_seed(batch)
    table = torch.randperm(num_blocks - 1, generator=gen)[: batch * width].view(batch, width)
    starts = torch.randint(context // 2, context, (batch,), generator=gen).tolist()  # mixed contexts
    layout = StepLayout(
        num_tokens=batch, padded_tokens=batch, num_decodes=batch, decode_rows=batch, chunk_starts=starts,
        chunk_lens=[1] * batch, block_table=table, token_chunk=torch.arange(batch),
        token_pos=torch.tensor(starts),
    )  # fmt: skip
    query = torch.randn(1, heads, batch, head_dim)
    key = torch.randn(1, kv_heads, batch, head_dim)
    backends = {"sdpa": SdpaBackend(kv), "cpu": CpuPagedBackend(kv, cpu_kernel.load())}
    states = {name: b.prepare(layout) for name, b in backends.items()}
    outs = {name: b.attend(states[name], 0, query, key, key, None) for name, b in backends.items()}
    diff = (outs["sdpa"] - outs["cpu"]).abs().max().item()
    tokens = sum(starts) + batch
    kv_bytes = 2 * tokens * kv_heads * head_dim * 4
    src = torch.empty(kv_bytes // 4)
    dst = torch.empty_like(src)
    iters = max(20, int(2e5 // (tokens + 1)))
    best = {"sdpa": float("inf"), "cpu": float("inf"), "copy": float("inf")}
    for _ in range(repeats):
        for name, b in backends.items():
            t = time_call(lambda b=b, name=name: b.attend(states[name], 0, query, key, key, None), iters)
            best[name] = min(best[name], t)
        best["copy"] = min(best["copy"], time_call(lambda: dst.copy_(src), iters))
    return {
        "batch": batch, "mean_context": tokens / batch, "kv_mb": kv_bytes / 1e6, "max_diff": diff,
        "sdpa_us": best["sdpa"] * 1e6, "cpu_us": best["cpu"] * 1e6, "copy_us": best["copy"] * 1e6,
        "speedup": best["sdpa"] / best["cpu"],
    }  # fmt: skip


def decode_steps(model, batch: int, context: int, steps: int, repeats: int) -> dict:
    """Milliseconds per whole decode step, each backend's engine taking turns on the same prompts."""
    from bench.decode_roofline import time_decode

    best = {}
    for _ in range(repeats):
        for backend in ("sdpa", "cpu"):
            args = argparse.Namespace(batch=batch, context=context, steps=steps, warmup=3, backend=backend,
                                      device="cpu")  # fmt: skip
            r = time_decode(model, args, graphs=False)
            best[backend] = min(best.get(backend, float("inf")), r["step_s"])
    return {"batch": batch, "context": context, "sdpa_ms": best["sdpa"] * 1e3, "cpu_ms": best["cpu"] * 1e3,
            "speedup": best["sdpa"] / best["cpu"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the built-in small Qwen2-VL)")
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default 1,2)")
    p.add_argument("--batches", default="1,8,16,32,64", help="decode batches (default 1,8,16,32,64)")
    p.add_argument("--context", type=int, default=256, help="prompt tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per engine (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the best of each counts (default 3)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from services.engine.attention import cpu_kernel
    from services.models.loader import load_model
    from services.models.tiny import ensure_tiny_model

    if cpu_kernel.load() is None:
        raise SystemExit("the CPU kernel could not be built here (no C compiler?)")
    model = load_model(args.model or ensure_tiny_model("qwen2_vl", "small"), device="cpu")
    text = model.family.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    results = {"calls": [], "steps": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): one decode layer call, {heads} heads over {kv_heads}, dim {head_dim}")
        print(
            f"{'batch':>5} {'ctx':>5} {'KV MB':>6} {'sdpa us':>8} {'cpu us':>8} {'copy us':>8} {'speed-up':>8}"
        )
        for batch in [int(b) for b in args.batches.split(",")]:
            r = attention_calls(batch, args.context, heads, kv_heads, head_dim, args.repeats)
            r["threads"] = threads
            results["calls"].append(r)
            print(f"{batch:5d} {r['mean_context']:5.0f} {r['kv_mb']:6.2f} {r['sdpa_us']:8.1f} {r['cpu_us']:8.1f} "
                  f"{r['copy_us']:8.1f} {r['speedup']:7.2f}x   (max diff {r['max_diff']:.1e})")  # fmt: skip
        print(f"{threads} thread(s): whole decode steps, {args.context}-token prompts")
        print(f"{'batch':>5} {'sdpa ms':>8} {'cpu ms':>8} {'speed-up':>8}")
        for batch in [int(b) for b in args.batches.split(",")]:
            r = decode_steps(model, batch, args.context, args.steps, args.repeats)
            r["threads"] = threads
            results["steps"].append(r)
            print(f"{batch:5d} {r['sdpa_ms']:8.2f} {r['cpu_ms']:8.2f} {r['speedup']:7.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
