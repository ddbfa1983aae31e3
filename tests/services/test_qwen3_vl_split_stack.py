"""Qwen3-VL across real stage processes (E1 P1 D1 over shared memory): each image's main and DeepStack
features leave the encoder as one tensor per item, cross the data plane, are split at prefill, and the
tokens equal transformers' generate."""

from __future__ import annotations

import asyncio

from cli.stack import Stack, StackConfig
from common.topology import parse_topology
from services.models.loader import load_model
from tests.reference import hf_greedy
from tests.services.test_split_stack import collect, request_with_image


def test_deepstack_features_cross_the_data_plane(tiny_qwen3_vl):
    checkpoint = tiny_qwen3_vl
    loaded = load_model(checkpoint)
    fam = loaded.family
    requests = [
        request_with_image(checkpoint, loaded.tokenizer, f"r{i}", 96 + 32 * i, 128, i) for i in range(3)
    ]
    expected = []
    for req, img in requests:
        item = fam.preprocess(img)
        assert req.images[0].num_tokens == fam.num_image_tokens(item)  # the gateway's count, 16-pixel patches
        expected.append(hf_greedy(checkpoint, fam, req.token_ids, [item], 12)[0])

    async def run():
        config = StackConfig(str(checkpoint), parse_topology("E1 P1 D1"), dataplane="shm", kv_cache_memory=16)
        stack = Stack(config)
        try:
            await stack.start(http=False)
            return await asyncio.gather(*(collect(stack.cluster, r) for r, _ in requests))
        finally:
            await stack.stop()

    assert asyncio.run(run()) == expected
