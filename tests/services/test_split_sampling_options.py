"""The same requests through a split stack (E1 P1 D1: prefill samples token 0, decode the rest) and a
monolithic one (EPD1) give the same tokens and logprobs: penalties, logit_bias, min_tokens and seeded
draws see the same prompt and output on either side of the hand-off, and token 0's logprobs travel
from the prefill process in FirstToken."""

from __future__ import annotations

import asyncio

from cli.stack import Stack, StackConfig
from common.logprobs import Logprobs
from common.prompting import chat_prompt_ids
from common.sampling_params import SamplingParams
from common.topology import parse_topology
from gateway.backend import GenerateRequest
from services.models.loader import load_model
from tests.services.test_split_stack import request_with_image

MAX_TOKENS = 12
TOL = 1e-4  # batches differ between the two stacks, so the float sums do, by a few 1e-6


def requests(checkpoint) -> list[GenerateRequest]:
    tok = load_model(checkpoint).tokenizer
    text = chat_prompt_ids(tok, "Count the birds", tok.convert_tokens_to_ids("<|image_pad|>"), [])
    seeded = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.9, seed=7, repetition_penalty=0.6, frequency_penalty=-0.5,
        presence_penalty=0.3, logit_bias={17: 3.0}, min_tokens=4, logprobs=4,
    )  # fmt: skip
    greedy = SamplingParams(max_tokens=MAX_TOKENS, frequency_penalty=-1.0, presence_penalty=-2.0, logprobs=2)
    image, _ = request_with_image(checkpoint, tok, "image", 84, 112, 0, max_tokens=MAX_TOKENS)
    image.params = SamplingParams(
        max_tokens=MAX_TOKENS, repetition_penalty=0.5, temperature=1.0, seed=3, logprobs=1
    )
    return [GenerateRequest("seeded", text, [], seeded), GenerateRequest("greedy", text, [], greedy), image]


async def collect(cluster, request: GenerateRequest) -> tuple[list[int], Logprobs]:
    tokens, logprobs = [], Logprobs()
    async for event in cluster.generate(request):
        tokens += event.token_ids
        assert event.logprobs is not None and len(event.logprobs) == len(event.token_ids)
        logprobs.extend(event.logprobs)
    return tokens, logprobs


def serve(checkpoint, topology: str, reqs: list[GenerateRequest]):
    async def run():
        stack = Stack(StackConfig(str(checkpoint), parse_topology(topology), kv_cache_memory=16))
        try:
            await stack.start(http=False)
            return await asyncio.gather(*(collect(stack.cluster, r) for r in reqs))
        finally:
            await stack.stop()

    return asyncio.run(run())


def test_split_and_monolithic_stacks_give_the_same_tokens_and_logprobs(tiny_qwen2_vl):
    reqs = requests(tiny_qwen2_vl)
    split = serve(tiny_qwen2_vl, "E1 P1 D1", reqs)
    whole = serve(tiny_qwen2_vl, "EPD1", reqs)
    for req, (s_tokens, s_lp), (w_tokens, w_lp) in zip(reqs, split, whole, strict=True):
        rid = req.request_id
        assert len(s_tokens) > 1, f"{rid}: nothing was decoded after the hand-off"
        assert s_tokens == w_tokens, f"{rid}: split {s_tokens} vs monolithic {w_tokens}"
        assert s_lp.top_token_ids == w_lp.top_token_ids, rid
        for a, b in ((s_lp.token_logprobs, w_lp.token_logprobs), (s_lp.top_logprobs, w_lp.top_logprobs)):
            assert max(abs(x - y) for x, y in zip(_flat(a), _flat(b), strict=True)) < TOL, rid
    assert len(split[0][0]) >= 4 and split[0][1].top_token_ids[0] and len(split[0][1].top_token_ids[0]) == 4


def _flat(values) -> list[float]:
    return [x for v in values for x in (v if isinstance(v, list) else [v])]
