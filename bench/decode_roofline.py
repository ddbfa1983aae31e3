"""Decode step time against the memory roofline, on one device.

A decode step must read every weight of the language model once and the KV of every running sequence
once; nothing faster than the device's memory bandwidth can do that. This benchmark runs `--batch`
sequences of `--context` tokens to their decode phase, times decode steps (eager, and with CUDA graphs
where the device has them), measures the bandwidth of a plain device-to-device copy in the same run, and
prints the step time against (weights + KV read) / bandwidth.

    python -m bench.decode_roofline --model DIR --device cuda [--batch 64] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import time


def copy_bandwidth(device: str, nbytes: int = 2**30, iters: int = 10) -> float:
    """Bytes per second a device copy moves (read + write counted), the roofline's bandwidth."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - start)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_decode(model, args, graphs: bool) -> dict:
    """Seconds per decode step with `args.batch` sequences at about `args.context` tokens each."""
    import random

    from common.sampling_params import SamplingParams
    from services.engine.config import EngineConfig
    from services.engine.engine import Engine
    from services.engine.memory import kv_layout

    fam = model.family
    config = EngineConfig(
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(2048, args.context),
        max_model_len=args.context + args.steps + 64,
        attention_backend=args.backend,
    )
    if args.device == "cpu":
        config.kv_cache_memory = (
            2 * args.batch * (args.context + args.steps + 64) * kv_layout(fam).token_bytes()
        )
    engine = Engine(fam, model.eos_token_ids, config)
    if not graphs:  # compiled kernels, each step launched eagerly
        engine.runner.graphs = None
    rng = random.Random(0)
    vocab = int(fam.config.text_config.vocab_size)
    params = SamplingParams(max_tokens=args.steps + args.warmup + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [rng.randrange(100, vocab) for _ in range(args.context)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.requests.values()):
        engine.step()  # prefill everything first
    for _ in range(args.warmup):
        engine.step()
    _sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    _sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    mean_context = sum(s.num_tokens for s in engine.scheduler.requests.values()) / args.batch
    return {"step_s": seconds, "mean_context": mean_context, "backend": engine.runner.backend.name,
            "graphs": engine.runner.graphs is not None and not engine.runner.graphs.failed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--device", default="cuda", help="cuda (default), cpu, npu")
    p.add_argument("--dtype", help="default: bfloat16 on accelerators, float32 on cpu")
    p.add_argument("--batch", type=int, default=64, help="sequences decoding at once (default 64)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per sequence (default 512)")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed decode steps first (default 5)")
    p.add_argument("--backend", default="auto", help="attention backend (default auto)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)

    from services.engine.memory import kv_layout
    from services.models.loader import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype, roles="PD")
    fam = model.family
    weights = sum(t.numel() * t.element_size() for t in fam.language_model.parameters())
    weights += fam.lm_head.weight.numel() * fam.lm_head.weight.element_size()
    if fam.lm_head.weight is fam.language_model.embed_tokens.weight:
        weights -= fam.lm_head.weight.numel() * fam.lm_head.weight.element_size()
    bandwidth = copy_bandwidth(args.device)
    modes = [("no graphs", False)] + ([("cuda graphs", True)] if args.device.startswith("cuda") else [])
    report = {"batch": args.batch, "context": args.context, "weights_bytes": weights,
              "copy_bandwidth_GBps": bandwidth / 1e9, "runs": {}}  # fmt: skip
    print(f"weights {weights / 2**20:.0f} MiB, device copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'mode':<14} {'step ms':>8} {'roofline ms':>12} {'x roofline':>11}")
    for name, graphs in modes:
        r = time_decode(model, args, graphs=graphs)
        kv_read = args.batch * r["mean_context"] * kv_layout(fam).token_bytes()
        roofline = (weights + kv_read) / bandwidth
        r.update(kv_read_bytes=kv_read, roofline_s=roofline, x_roofline=r["step_s"] / roofline)
        report["runs"][name] = r
        print(f"{name:<14} {r['step_s'] * 1e3:8.2f} {roofline * 1e3:12.3f} {r['x_roofline']:10.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
