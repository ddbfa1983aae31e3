"""Time to first token with and without prefix caching, side by side in one run, on one engine process.

Each request is a shared system prompt of `--shared` tokens plus a tail of `--tail` tokens of its own
(and, with `--image WxH`, the same picture after the system prompt), served one at a time so each
figure is one prompt's prefill (the encoder runs before the clock starts: this times the LLM alone). The two engines (prefix caching on and off) take turns request by
request, so drift of the machine falls on both; the first request of the cached engine is its cold
start and is reported apart. The greedy tokens of the two must be equal, or the run fails.

    python -m bench.prefix_cache [--model DIR] [--requests 16] [--shared 256] [--tail 32] [--image 224x224]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def _prompts(tokenizer, args) -> list[list[int]]:
    rng = random.Random(0)
    vocab = [i for i in range(200, min(tokenizer.vocab_size, 20000))]
    shared = [rng.choice(vocab) for _ in range(args.shared)]
    return [shared + [rng.choice(vocab) for _ in range(args.tail)] for _ in range(args.requests + 1)]


def _first_token_s(llm, prepared, params) -> tuple[float, list[int], int]:
    """Seconds from submitting one prepared request to its first token; its tokens; cached tokens."""
    engine = llm.engine
    before = engine.block_manager.hit_tokens
    start = time.perf_counter()
    rid = llm.submit(prepared, params)
    first = None
    while engine.has_unfinished():
        done = llm.step()
        if first is None:
            first = time.perf_counter() - start
        for c in done:
            if c.request_id == rid:
                return first, c.token_ids, engine.block_manager.hit_tokens - before
    raise RuntimeError("the request did not finish")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the built-in small Qwen2-VL)")
    p.add_argument("--requests", type=int, default=16, help="measured requests per engine (default 16)")
    p.add_argument("--shared", type=int, default=256, help="shared system-prompt tokens (default 256)")
    p.add_argument("--tail", type=int, default=32, help="tokens of each request's own (default 32)")
    p.add_argument("--image", help="WxH: the same picture in every prompt after the shared part")
    p.add_argument("--output-len", type=int, default=4, help="tokens generated per request (default 4)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from common.sampling_params import SamplingParams
    from services.engine.config import EngineConfig
    from services.engine.inputs import ModelInputs
    from services.engine.llm import LLM, PreparedRequest
    from services.models.loader import load_model
    from services.models.tiny import ensure_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model or str(ensure_tiny_model(preset="small")), roles="EPD")
    fam = model.family
    llms = {
        on: LLM(model, EngineConfig(enable_prefix_caching=on, kv_cache_memory=256 << 20, max_model_len=4096))
        for on in (True, False)
    }
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    prompts = _prompts(model.tokenizer, args)
    image = None
    if args.image:
        import numpy as np
        from PIL import Image

        w, h = (int(x) for x in args.image.lower().split("x"))
        image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8))

    def prepare(ids: list[int]) -> PreparedRequest:
        if image is None:
            return PreparedRequest(ids, ModelInputs())
        item = fam.preprocess(image)
        n = fam.num_image_tokens(item)
        with_image = ids[: args.shared] + [fam.image_token_id] * n + ids[args.shared :]
        inputs = fam.model_inputs(with_image, [item.grid_thw], fam.encode([item]))
        return PreparedRequest(with_image, inputs, [("bench-image", n)])

    for llm in llms.values():  # warm both (kernels, allocator) on a prompt nobody shares
        _first_token_s(llm, prepare(list(range(300, 300 + args.shared + args.tail))), params)
    times: dict[bool, list[float]] = {True: [], False: []}
    cached: list[int] = []
    cold = None
    for i, ids in enumerate(prompts):
        tokens = {}
        for on in (True, False) if i % 2 else (False, True):
            seconds, tokens[on], hits = _first_token_s(llms[on], prepare(ids), params)
            if on and i == 0:
                cold = seconds
            elif i:
                times[on].append(seconds)
            if on and i:
                cached.append(hits)
        if tokens[True] != tokens[False]:
            raise SystemExit(
                f"request {i}: tokens differ with the prefix cache: {tokens[True]} vs {tokens[False]}"
            )
    on, off = statistics.mean(times[True]), statistics.mean(times[False])
    prompt_len = len(prepare(prompts[0]).token_ids)
    report = {
        "requests": args.requests, "prompt_tokens": prompt_len, "shared_tokens": args.shared,
        "image": args.image, "ttft_ms_cached": on * 1e3, "ttft_ms_uncached": off * 1e3,
        "ttft_ms_cold": (cold or 0) * 1e3, "speedup": off / on, "mean_cached_tokens": statistics.mean(cached),
    }  # fmt: skip
    print(f"{args.requests} requests of {prompt_len} prompt tokens ({args.shared} shared"
          f"{', one ' + args.image + ' image' if args.image else ''}), one at a time, tokens equal")  # fmt: skip
    print(f"  TTFT without prefix caching {off * 1e3:8.1f} ms")
    print(f"  TTFT with prefix caching    {on * 1e3:8.1f} ms  ({report['mean_cached_tokens']:.0f} tokens cached"
          f" on average; first request, cold: {report['ttft_ms_cold']:.1f} ms)")  # fmt: skip
    print(f"  speed-up {off / on:.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
