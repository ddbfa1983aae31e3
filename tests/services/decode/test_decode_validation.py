"""What a decode instance checks in KV_RESERVE and KV_READY (a bad one fails its request with a 400
naming the field, or is dropped when it names someone else's reservation), and a request the engine
gives up: a 503 that says the decode instance ran out of KV memory, never finish_reason "error"."""

from __future__ import annotations

import pytest
import torch

from common.protocol import KvReady, KvReserve
from common.sampling_params import SamplingParams
from services.decode.worker import DecodeWorker
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.memory import size_kv_pool
from services.models.loader import load_model
from tests.services.test_stage_validation import PARAMS, errors, prefill, text_ids
from tests.services.test_workers import Router, build


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


def drive(router: Router, workers, steps: int = 300) -> None:
    for _ in range(steps):
        router.pump()
        for w in workers:
            w.poll()
            if w.has_work():
                w.step()


def reserve(dec, rid, n, sender="gateway", params=PARAMS):
    msg = KvReserve(request_id=rid, num_prompt_tokens=n, params=params, prefill_id="P", prefill_address="P")
    msg.sender = sender
    dec.on_kv_reserve(msg)


def ready(dec, rid, token_ids, n, sender="P"):
    msg = KvReady(request_id=rid, token_ids=token_ids, num_prompt_tokens=n)
    msg.sender = sender
    dec.on_kv_ready(msg)


def test_a_bad_kv_reserve_or_kv_ready_fails_its_request_and_frees_its_blocks(loaded):
    router, _, _, _, dec = build(loaded)
    bm = dec.engine.block_manager
    reserve(dec, "long", 1024)
    reserve(dec, "none", 0)
    assert [(e.request_id, e.status) for e in router.to_gateway_log] == [("long", 400), ("none", 400)]
    assert "num_prompt_tokens" in errors(router, "long")[0].message and bm.num_free_blocks == bm.num_blocks

    reserve(dec, "a", 40)
    ready(dec, "a", [5] * 41, 40, sender="intruder")  # not the prefill the reservation names: dropped
    assert "a" in dec.receiving and not errors(router, "a")
    ready(dec, "a", [5] * 40 + [10**6], 40)
    assert (
        errors(router, "a")[0].status == 400
        and "token_ids: token id 1000000" in errors(router, "a")[0].message
    )
    for rid, token_ids, n, words in (
        ("b", [5] * 41, 39, "num_prompt_tokens 39"),
        ("c", [5] * 40, 40, "token_ids: 40 tokens for a prompt of 40"),
    ):
        reserve(dec, rid, 40)
        ready(dec, rid, token_ids, n)
        assert errors(router, rid) and words in errors(router, rid)[0].message, router.to_gateway_log
    dec.poll()
    assert not dec.request_ids() and bm.num_free_blocks == bm.num_blocks and not len(dec.claims)


def test_a_decode_request_the_engine_gives_up_fails_with_a_503(loaded):
    """Two requests outgrow an 8-block pool with no swap space: the newer one is preempted, and a decode
    stage cannot recompute it; it fails with a 503, the older one finishes."""
    router, dp, _, pre, _ = build(loaded)
    fam = loaded.family
    cfg = EngineConfig(num_blocks=8, max_model_len=128, swap_space_bytes=0)
    dp["D"].free("kv")
    pool = dp["D"].allocate("kv", size_kv_pool(fam, cfg).nbytes)
    dec = DecodeWorker(Engine(fam, loaded.eos_token_ids, cfg, kv_buffer=torch.frombuffer(pool, dtype=torch.uint8)),
                       router.io("D"), dp["D"])  # fmt: skip
    router.handlers = {"P": lambda m, b: pre.on_kv_dest(m), "D": lambda m, b: dec.on_kv_ready(m)}
    ids = text_ids(loaded)
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    for rid in ("old", "new"):
        reserve(dec, rid, len(ids), sender="", params=params)
        pre.on_prefill(prefill(rid, ids, params=params))
    drive(router, [pre, dec])
    failed = errors(router, "new")
    assert (
        failed and failed[0].status == 503 and failed[0].message == "the decode instance ran out of KV memory"
    )
    done = [u for m in router.to_gateway_log if type(m).__name__ == "Tokens" for u in m.updates if u.finished]
    assert [(u.request_id, u.finish_reason) for u in done] == [("old", "length")]
    assert not any(u.finish_reason == "error" for m in router.to_gateway_log if type(m).__name__ == "Tokens"
                   for u in m.updates)  # fmt: skip
    assert dec.engine.block_manager.num_free_blocks == dec.engine.block_manager.num_blocks
