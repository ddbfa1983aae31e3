"""Where one decode step's time goes: scheduling, the host-side layout, embedding, each kind of layer work,
the logits, the sampler and the step's bookkeeping, at a serving-like batch.

    python -m bench.decode_breakdown [--model DIR] [--batch 8] [--context 128] [--steps 60] [--threads 1]

Every phase is timed by wrapping the function that does it (perf_counter around the call: exact on a
CPU, where calls are synchronous); "model, rest" is the forward minus its attention and linear layers
(norms, rotary embedding, residual adds, activation). The same steps are timed without the wrappers
first, so the wrappers' own cost shows as the difference of the two totals. The linear layers' time
is set against the memory roofline: their weights read once per step at the bandwidth of a plain copy
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from contextlib import contextmanager


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth = 0

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    @contextmanager
    def hooks(self, modules, label: str):
        """Forward pre/post hooks on every module in `modules`, summed under `label`."""
        starts: dict[int, float] = {}

        def pre(module, _args):
            starts[id(module)] = time.perf_counter()

        def post(module, _args, _out):
            self.seconds[label] += time.perf_counter() - starts.pop(id(module))

        handles = [
            h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def engine_at_batch(model, args):
    """An engine over `model` with `args.batch` sequences of `args.context`-token prompts, prefilled and
    a few steps into decoding: every later step is a pure decode step at that batch."""
    from common.sampling_params import SamplingParams
    from services.engine.config import EngineConfig
    from services.engine.engine import Engine
    from services.engine.memory import kv_layout

    fam = model.family
    total = args.context + args.steps * 3 + 64
    config = EngineConfig(
        max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.context), max_model_len=total
    )
    config.kv_cache_memory = 2 * args.batch * total * kv_layout(fam).token_bytes()
    engine = Engine(fam, model.eos_token_ids, config)
    rng = random.Random(0)
    vocab = int(fam.config.text_config.vocab_size)
    params = SamplingParams(max_tokens=args.steps * 3 + 16, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [rng.randrange(100, vocab) for _ in range(args.context)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(5):
        engine.step()
    return engine


def mean_step_seconds(engine, n: int) -> float:
    """Mean wall time of the engine's next `n` steps."""
    start = time.perf_counter()
    for _ in range(n):
        engine.step()
    return (time.perf_counter() - start) / n


def breakdown(model, args) -> dict:
    import torch

    from services.engine import model_runner

    engine = engine_at_batch(model, args)
    plain = mean_step_seconds(engine, args.steps)
    timers = Timers()
    runner, fam = engine.runner, model.family
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(runner, "_host_step", "host layout")
    timers.wrap(fam, "embed", "embed")
    timers.wrap(fam, "logits", "logits (lm_head)")
    timers.wrap(model_runner, "sample_batch", "sampler")
    timers.wrap(runner, "execute", "execute (all of the runner)")
    timers.wrap(fam, "forward", "forward")
    linears = [m for m in fam.language_model.modules() if isinstance(m, torch.nn.Linear)]
    attn = [m for n, m in fam.language_model.named_modules() if n.endswith("self_attn")]
    with timers.hooks(linears, "linear layers"), timers.hooks(attn, "attention module (incl. its linears)"):
        timed = mean_step_seconds(engine, args.steps)
    s = {k: v / args.steps for k, v in timers.seconds.items()}
    attention_core = s["attention module (incl. its linears)"] - _attn_linear_share(s, fam, attn)
    rows = {
        "schedule": s["schedule"],
        "host layout": s["host layout"],
        "embed": s["embed"],
        "linear layers (q,k,v,o, mlp)": s["linear layers"],
        "attention (paged, incl. KV write)": attention_core,
        "model, rest (norms, rotary, adds, act)": s["forward"] - s["embed"] - s["linear layers"] - attention_core,
        "logits (lm_head)": s["logits (lm_head)"],
        "sampler": s["sampler"],
        "step bookkeeping (outputs, stop checks)": timed - s["schedule"] - s["execute (all of the runner)"],
        "runner, rest (sample rows, step glue)": s["execute (all of the runner)"]
        - s["host layout"] - s["forward"] - s["logits (lm_head)"] - s["sampler"],
    }  # fmt: skip
    return {"step_s": plain, "step_s_wrapped": timed, "phases_s": rows}


def _attn_linear_share(s: dict, fam, attn) -> float:
    """The linear layers inside the attention modules, by their share of the weights (all linears read
    their weights once per step, and a decode step is bound by that read)."""
    import torch

    def nbytes(mods):
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())

    inside = nbytes([m for a in attn for m in a.modules() if isinstance(m, torch.nn.Linear)])
    every = nbytes([m for m in fam.language_model.modules() if isinstance(m, torch.nn.Linear)])
    return s["linear layers"] * inside / every if every else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the built-in small Qwen2-VL)")
    p.add_argument("--batch", type=int, default=8, help="sequences decoding at once (default 8)")
    p.add_argument("--context", type=int, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--steps", type=int, default=60, help="timed decode steps per pass (default 60)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as a stage of a split stack)"
    )
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from bench.decode_roofline import copy_bandwidth
    from services.models.loader import load_model
    from services.models.tiny import ensure_tiny_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model or ensure_tiny_model("qwen2_vl", "small"), device="cpu", roles="PD")
    fam = model.family
    linear_bytes = sum(
        p.numel() * p.element_size()
        for m in fam.language_model.modules()
        if isinstance(m, torch.nn.Linear)
        for p in m.parameters()
    )
    bandwidth = copy_bandwidth("cpu", nbytes=2**28)
    out = breakdown(model, args)
    out.update(batch=args.batch, context=args.context, threads=args.threads, linear_bytes=linear_bytes,
               copy_bandwidth_GBps=bandwidth / 1e9, linear_roofline_s=linear_bytes / bandwidth)  # fmt: skip
    print(f"decode step, batch {args.batch}, context ~{args.context}, {args.threads} thread(s): "
          f"{out['step_s'] * 1e3:.2f} ms ({out['step_s_wrapped'] * 1e3:.2f} ms with the timers)")  # fmt: skip
    for name, sec in out["phases_s"].items():
        print(f"  {name:<42} {sec * 1e3:7.3f} ms  {sec / out['step_s_wrapped']:6.1%}")
    print(f"  linear weights {linear_bytes / 2**20:.0f} MiB at {bandwidth / 1e9:.1f} GB/s: "
          f"roofline {out['linear_roofline_s'] * 1e3:.2f} ms")  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
