"""Fence, then free: blocks of a request aborted while its KV was still arriving stay out of reach
until no byte of that transfer can land, so the next request's KV is never overwritten by a late one.

Over shared memory a producer checks for aborts only between chunks, so the chunk it is copying when
the consumer aborts still lands; the test plays that chunk by writing into the aborted request's blocks
after the abort, exactly where the producer would.
"""

from __future__ import annotations

import time

import pytest
import torch

from common.dataplane import Region, TransferState, create_dataplane
from common.protocol import KvReserve
from common.sampling_params import SamplingParams
from services.decode.worker import DecodeWorker
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.kv_cache import block_offset
from services.engine.memory import size_kv_pool
from services.models.loader import load_model
from tests.services.test_workers import Router


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl, roles="D")


def reserve(dec, router, rid, n):
    dec.on_kv_reserve(KvReserve(request_id=rid, num_prompt_tokens=n, params=SamplingParams(max_tokens=4),
                                prefill_id="P", prefill_address="P"))  # fmt: skip
    dest = next(m for address, m, _ in router.queue if address == "P" and m.request_id == rid)
    return dest


def test_blocks_of_a_request_aborted_mid_write_are_freed_only_after_the_fence(loaded):
    fam = loaded.family
    consumer, producer = create_dataplane("shm"), create_dataplane("shm")
    consumer.abort_fence_s = 0.5
    cfg = EngineConfig(num_blocks=8, max_model_len=64)
    pool = torch.frombuffer(consumer.allocate("kv", size_kv_pool(fam, cfg).nbytes), dtype=torch.uint8)
    engine = Engine(fam, loaded.eos_token_ids, cfg, kv_buffer=pool)
    router = Router()
    dec = DecodeWorker(engine, router.io("D"), consumer)
    try:
        a = reserve(dec, router, "a", 40)  # 3 of the 8 blocks
        dec.on_abort("a")  # the producer is still writing "a"
        assert "a" in dec.fencing and engine.block_manager.num_free_blocks == 8 - 3
        b = reserve(dec, router, "b", 40)
        assert not set(a.block_ids) & set(b.block_ids), "the next request must not get fenced blocks"

        # b's KV, written for real by a producer plane, then a's late chunk lands where a's blocks are
        bb, layers = b.block_bytes, engine.layout.num_layers
        b_bytes = torch.randint(0, 255, (layers * 2 * len(b.block_ids) * bb,), dtype=torch.uint8)
        views = b_bytes.view(layers * 2 * len(b.block_ids), bb)
        items = [
            (memoryview(views[(layer * 2 + kind) * len(b.block_ids) + i].numpy()),
             Region("kv", block_offset(layer, kind, block, b.pool_blocks, bb), bb))
            for layer in range(layers) for kind in (0, 1) for i, block in enumerate(b.block_ids)
        ]  # fmt: skip
        assert producer.write(b.dataplane, b.transfer_id, items).wait(30) is TransferState.SUCCESS
        for layer in range(layers):
            for kind in (0, 1):
                for block in a.block_ids:
                    at = block_offset(layer, kind, block, a.pool_blocks, bb)
                    pool[at : at + bb] = 0xEE  # the late chunk of the aborted transfer
        for layer in range(layers):
            for kind in (0, 1):
                for i, block in enumerate(b.block_ids):
                    at = block_offset(layer, kind, block, b.pool_blocks, bb)
                    assert torch.equal(pool[at : at + bb], views[(layer * 2 + kind) * len(b.block_ids) + i])

        time.sleep(0.6)
        dec.poll()  # the fence has passed: a's blocks go back to the pool
        assert not dec.fencing
        dec.on_abort("b")
        time.sleep(0.01)
        dec.poll()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        producer.close()
        consumer.close()


def test_a_plane_that_copies_under_its_lock_frees_at_once(loaded):
    fam = loaded.family
    plane = create_dataplane("fake")
    assert plane.abort_fence_s == 0
    cfg = EngineConfig(num_blocks=8, max_model_len=64)
    pool = torch.frombuffer(plane.allocate("kv", size_kv_pool(fam, cfg).nbytes), dtype=torch.uint8)
    engine = Engine(fam, loaded.eos_token_ids, cfg, kv_buffer=pool)
    router = Router()
    dec = DecodeWorker(engine, router.io("D"), plane)
    reserve(dec, router, "a", 40)
    dec.on_abort("a")
    assert not dec.fencing and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
