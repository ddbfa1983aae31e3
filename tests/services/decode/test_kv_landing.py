"""Host staging of KV (what a decode instance with a device pool does), on CPU: the data plane writes
into a staging area, the worker copies each request into its private pool on arrival; tokens equal
transformers' generate, through the workers and through real stage processes over shm and tcp."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cli.stack import Stack, StackConfig
from common.dataplane import create_dataplane
from common.protocol import KvReserve
from common.sampling_params import SamplingParams
from common.topology import parse_topology
from services.decode.kv_landing import StagedLanding
from services.decode.worker import DecodeWorker
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.kv_cache import KVCache, KVLayout
from services.models.loader import load_model
from tests.reference import hf_greedy, make_image
from tests.services.test_split_stack import collect, request_with_image
from tests.services.test_workers import build, request, run


def test_staged_landing_copies_blocks_into_the_pool_and_frees_them():
    kv = KVCache(KVLayout(2, 2, 4, torch.float32), 12, 4)
    landing = StagedLanding(kv, create_dataplane("fake"), num_blocks=5)
    staging = landing.reserve("a", [7, 3, 9])
    assert staging == [0, 1, 2] and landing.num_free_blocks == 2
    assert landing.reserve("b", [1, 2, 4]) is None, "three blocks do not fit in the two left"
    landing.area[:, :, staging] = torch.randn(2, 2, 3, 4, 2, 4)
    written = landing.area[:, :, staging].clone()
    landing.land("a", [7, 3, 9])
    assert torch.equal(kv.pool[:, :, [7, 3, 9]], written)
    assert landing.num_free_blocks == 5 and landing.reserve("b", [1, 2, 4]) == [0, 1, 2]
    landing.release("b")
    assert landing.num_free_blocks == 5


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


def test_split_workers_with_a_private_decode_pool_match_transformers(loaded, tiny_qwen2_vl):
    router, dp, enc, pre, _ = build(loaded)
    dp["D"].free("kv")  # build() put a decode pool there; this decode's pool is private
    engine = Engine(loaded.family, loaded.eos_token_ids, EngineConfig(num_blocks=64, max_model_len=1024))
    landing = StagedLanding(engine.kv, dp["D"], num_blocks=24)
    dec = DecodeWorker(engine, router.io("D"), dp["D"], landing=landing)
    router.handlers["D"] = lambda m, b: dec.on_kv_ready(m)
    for rid, size in (("a", (140, 100)), ("b", (84, 168))):
        data, h, item, ids, params = request(loaded, rid, make_image(*size))
        expected, _ = hf_greedy(tiny_qwen2_vl, loaded.family, ids, [item], 10)
        assert run(router, enc, pre, dec, loaded, dp, rid, data, h, item, ids, params) == expected
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and landing.num_free_blocks == 24


def test_abort_before_landing_frees_pool_and_staging_blocks(loaded):
    router, dp, enc, pre, _ = build(loaded)
    dp["D"].free("kv")  # build() put a decode pool there; this decode's pool is private
    engine = Engine(loaded.family, loaded.eos_token_ids, EngineConfig(num_blocks=64, max_model_len=1024))
    landing = StagedLanding(engine.kv, dp["D"], num_blocks=24)
    dec = DecodeWorker(engine, router.io("D"), dp["D"], landing=landing)
    dec.on_kv_reserve(KvReserve(request_id="x", num_prompt_tokens=40, params=SamplingParams(),
                                prefill_id="P", prefill_address="P"))  # fmt: skip
    assert landing.num_free_blocks == 21 and "x" in dec.receiving
    dec.on_abort("x")
    assert (
        landing.num_free_blocks == 24
        and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    )


@pytest.mark.parametrize("dataplane", ["shm", "tcp"])
def test_split_stack_with_kv_staging_gives_transformers_tokens(dataplane, tiny_qwen2_vl):
    loaded = load_model(tiny_qwen2_vl)
    requests = [
        request_with_image(tiny_qwen2_vl, loaded.tokenizer, f"r{i}", 84 + 28 * i, 112, i) for i in range(3)
    ]
    expected = [
        hf_greedy(tiny_qwen2_vl, loaded.family, req.token_ids, [loaded.family.preprocess(img)], 12)[0]
        for req, img in requests
    ]

    async def go():
        config = StackConfig(
            str(tiny_qwen2_vl), parse_topology("E1 P1 D1"), dataplane=dataplane, kv_cache_memory=16,
            kv_staging="on",
        )  # fmt: skip
        stack = Stack(config)
        await stack.start(http=False)
        try:
            return await asyncio.gather(*(collect(stack.cluster, req) for req, _ in requests))
        finally:
            await stack.stop()

    assert asyncio.run(go()) == expected
