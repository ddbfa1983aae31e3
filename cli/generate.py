"""`epd-serve generate`: one prompt through the monolithic path, printed as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a completion for one prompt (and images) in this process",
        description=(
            "Run one request through the whole model in this process: chat template, image encoder, "
            "prefill and decode. Without --model, a tiny random-weight Qwen2-VL is built on first use "
            "(its answers are gibberish; it exists to exercise the real code path offline)."
        ),
    )
    p.add_argument("--model", help="checkpoint folder (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image; repeat for more")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 (default) disables top-k")
    p.add_argument("--seed", type=int, help="seed for sampling; same seed, same tokens")
    p.add_argument("--stop", action="append", default=[], help="a stop string; repeat for more")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, npu")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on cpu, else bfloat16)")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason"}')
    p.set_defaults(run=run)


def fail(message: str) -> int:
    print(f"epd-serve generate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from common.media import MediaError, load_image_path
    from common.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
        )
        images = [load_image_path(path) for path in args.image]
    except (ValueError, MediaError) as exc:
        return fail(str(exc))

    from services.engine.llm import LLM
    from services.models.loader import ModelLoadError
    from services.models.tiny import ensure_tiny_model

    try:
        llm = LLM(args.model or ensure_tiny_model(), device=args.device, dtype=args.dtype)
        request = llm.prepare(args.prompt, images)
    except (ModelLoadError, ValueError) as exc:
        return fail(str(exc))
    llm.submit(request, params)
    (completion,) = llm.run()
    if args.json:
        print(
            json.dumps(
                {
                    "text": completion.text,
                    "token_ids": completion.token_ids,
                    "finish_reason": completion.finish_reason,
                    "prompt_tokens": completion.num_prompt_tokens,
                }
            )
        )
    else:
        print(completion.text)
    return 0
