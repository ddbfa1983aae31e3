"""A bad message never takes a stage down: every field from the wire is checked by the stage that
receives it, a bad one fails its request with a 400 that names the field (or is dropped and counted
when it names someone else's request), and a step that raises anyway fails only the requests of that
step. First through the workers wired in one process, then against real stage processes."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
import zmq.asyncio

from cli.stack import Stack, StackConfig
from common.mailbox import Mailbox
from common.protocol import Encode, FeatureOffer, KvDest, MMItem, MMRef, Prefill
from common.sampling_params import SamplingParams
from common.topology import parse_topology
from gateway.backend import BackendError, GenerateRequest
from services.engine.engine import RequestOutput
from services.models.loader import load_model
from tests.reference import hf_greedy, make_image
from tests.services.test_workers import Frame, Router, build, request, run

PARAMS = SamplingParams(max_tokens=4)


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


def errors(router: Router, rid: str) -> list:
    return [m for m in router.to_gateway_log if type(m).__name__ == "RequestError" and m.request_id == rid]


def text_ids(loaded, n: int = 40) -> list[int]:
    """A text prompt of `n` tokens (three KV blocks for 40)."""
    ids = loaded.tokenizer.encode("Tell me about the weather in a few words, please.")
    return (ids * n)[:n]


def prefill(rid: str, ids: list[int], **fields) -> Prefill:
    args = {"request_id": rid, "token_ids": ids, "params": PARAMS, "decode_id": "D", "decode_address": "D"}
    return Prefill(**{**args, **fields})


# ---- prefill -------------------------------------------------------------------------------------


def bad_prefills(loaded):
    """(name, fields, words the error must hold) for one image request."""
    _, h, item, ids, _ = request(loaded, "x", make_image(140, 100))
    ref = MMRef(hash=h, grid_thw=item.grid_thw, num_tokens=20)
    other = request(loaded, "y", make_image(224, 168))[2]  # 48 tokens: more than the prompt has
    return (
        [
            ("past the vocabulary", {"token_ids": [*ids, 10**6]}, "token_ids: token id 1000000"),
            ("negative", {"token_ids": [-1, *ids]}, "token_ids: token id -1 at position 0"),
            ("empty", {"token_ids": []}, "token_ids is empty"),
            ("longer than the context", {"token_ids": [1] * 1024}, "token_ids: a prompt of 1024 tokens"),
            ("no deadline", {"deadline_s": math.nan}, "deadline_s"),
            ("an hour", {"deadline_s": 3600.0}, "deadline_s"),
            ("no decode address", {"decode_address": ""}, "decode_address is empty"),
            ("no request id", {"request_id": ""}, "request_id is empty"),
            (
                "odd grid",
                {"mm": [MMRef(hash=h, grid_thw=(1, 3, 4), num_tokens=3)]},
                "mm[0]: grid_thw [1, 3, 4]",
            ),
            ("zero grid", {"mm": [MMRef(hash=h, grid_thw=(0, 8, 10), num_tokens=0)]}, "mm[0]: grid_thw"),
            (
                "a larger image's grid",
                {"mm": [MMRef(hash=h, grid_thw=other.grid_thw, num_tokens=48)]},
                "runs are not in token_ids: run 0 wants 48 placeholders at position",
            ),
            ("two images, one run", {"mm": [ref, ref]}, "run 1 of 20 placeholders is missing"),
            (
                "unknown kind",
                {"mm": [MMRef(hash=h, grid_thw=item.grid_thw, num_tokens=20, kind="smell")]},
                "mm[0].kind 'smell'",
            ),
            (
                "a video where the prompt has an image",
                {
                    "mm": [
                        MMRef(
                            hash=h, grid_thw=item.grid_thw, num_tokens=20, kind="video", second_per_grid_t=1.0
                        )
                    ]
                },
                "the video items' placeholder runs are not in token_ids: run 0 of 20",  # image pads are text
            ),
            (
                "a video without its seconds",
                {
                    "mm": [
                        MMRef(
                            hash=h,
                            grid_thw=(2, 8, 10),
                            num_tokens=40,
                            kind="video",
                            second_per_grid_t=math.nan,
                        )
                    ]
                },
                "mm[0].second_per_grid_t",
            ),
            (
                "an image of two frames",
                {"mm": [MMRef(hash=h, grid_thw=(2, 8, 10), num_tokens=40)]},
                "an image has one",
            ),
            (
                "long hash",
                {"mm": [MMRef(hash="h" * 300, grid_thw=item.grid_thw, num_tokens=20)]},
                "mm[0].hash",
            ),
        ],
        ids,
        ref,
    )


def test_a_bad_prefill_fails_its_request_with_a_400_naming_the_field(loaded):
    cases, ids, ref = bad_prefills(loaded)
    router, _, _, pre, _ = build(loaded)
    for i, (name, fields, words) in enumerate(cases):
        msg = prefill(f"bad{i}", ids, mm=[ref])
        for field, value in fields.items():
            setattr(msg, field, value)
        pre.on_prefill(msg)
        failed = errors(router, msg.request_id)
        assert len(failed) == 1 and failed[0].status == 400, f"{name}: {router.to_gateway_log}"
        assert words in failed[0].message, f"{name}: {failed[0].message}"
        assert not pre.request_ids() and pre.refusals.total == i + 1, name
        assert pre.features.cache._pins == {}, f"{name}: a refused request pinned features"


def test_a_duplicate_prefill_is_dropped_and_the_live_request_goes_on(loaded):
    router, _, _, pre, _ = build(loaded)
    ids = text_ids(loaded)
    pre.on_prefill(prefill("live", ids))
    pre.on_prefill(prefill("live", [*ids, 10**6]))  # someone else's request under the same id
    assert not errors(router, "live") and pre.refusals.total == 1
    pre.step()
    first = [m for m in router.to_gateway_log if type(m).__name__ == "FirstToken"]
    assert [m.request_id for m in first] == ["live"]


def test_kv_dest_must_come_from_the_requests_decode_and_fit_its_prompt(loaded):
    router, dp, _, pre, _ = build(loaded)
    ids = text_ids(loaded)
    blocks = -(-len(ids) // 16)

    def dest(rid, sender="D", **fields):
        args = {"request_id": rid, "block_ids": list(range(blocks)), "transfer_id": "t", "pool_blocks": 65,
                "block_bytes": pre.engine.kv.block_bytes, "dataplane": dp["D"].descriptor()}  # fmt: skip
        msg = KvDest(**{**args, **fields})
        msg.sender = sender
        return msg

    pre.on_prefill(prefill("a", ids))
    pre.on_kv_dest(dest("a", sender="intruder", block_ids=[60] * blocks))  # redirecting the KV: dropped
    assert not errors(router, "a") and pre.routes["a"].has_dest is False
    for i, (fields, words) in enumerate(
        [
            ({"block_ids": list(range(blocks + 1))}, f"block_ids: {blocks + 1} blocks for a prompt"),
            ({"block_ids": [0] * blocks}, "listed twice"),
            ({"block_ids": [64, *range(1, blocks)], "pool_blocks": 64}, "block_ids must lie in [0, 64)"),
            ({"block_bytes": 7}, "block_bytes 7"),
            ({"dataplane": {"backend": "elsewhere"}}, "dataplane"),
        ]
    ):
        rid = f"r{i}"
        pre.on_prefill(prefill(rid, ids))
        pre.on_kv_dest(dest(rid, **fields))
        failed = errors(router, rid)
        assert failed and failed[0].status == 400 and words in failed[0].message, (fields, failed)
        assert rid not in pre.request_ids()
    # a destination before its request is checked once the request comes
    pre.on_kv_dest(dest("early", block_ids=list(range(blocks + 3))))
    pre.on_prefill(prefill("early", ids))
    assert errors(router, "early") and "block_ids" in errors(router, "early")[0].message


def test_a_bad_feature_offer_is_refused_before_any_memory_is_set_aside(loaded):
    router, _, _, pre, _ = build(loaded)
    hidden = loaded.family.hidden_size
    good = {"hash": "h", "nbytes": 20 * hidden * 4, "dtype": "float32", "shape": [20, hidden],
            "encoder_address": "E"}  # fmt: skip
    for fields in (
        {"dtype": "int64"},
        {"dtype": "cuda"},
        {"shape": [20, hidden + 1], "nbytes": 20 * (hidden + 1) * 4},
        {"shape": [20]},
        {"nbytes": 1},
        {"shape": [2**40, hidden], "nbytes": 2**40 * hidden * 4},
        {"encoder_address": ""},
    ):
        pre.on_feature_offer(FeatureOffer(**{**good, **fields}))
    assert pre.refusals.total == 7 and not pre.features._incoming and not router.queue
    pre.on_feature_offer(FeatureOffer(**good))
    assert len(pre.features._incoming) == 1 and router.queue, "a good offer gets a destination"
    pre.limits = dataclasses.replace(pre.limits, max_feature_bytes=1 << 20)  # a small cache
    size = 1000 * hidden * 4  # 1000 rows each, under the context; only some fit the cache together
    fit = ((1 << 20) - good["nbytes"]) // size
    for i in range(8):
        pre.on_feature_offer(
            FeatureOffer(**{**good, "hash": f"big{i}", "shape": [1000, hidden], "nbytes": size})
        )
    assert pre.features.incoming_bytes == good["nbytes"] + fit * size and pre.refusals.total == 7 + 8 - fit


def test_a_prefill_output_without_tokens_fails_its_request_instead_of_raising(loaded):
    router, _, _, pre, _ = build(loaded)
    pre.on_prefill(prefill("gone", text_ids(loaded)))
    pre.engine.step = lambda layer_hook=None: [RequestOutput("gone", [], True, "error")]
    pre.step()
    failed = errors(router, "gone")
    assert failed and failed[0].status == 503 and "ran out of KV memory" in failed[0].message


# ---- encode --------------------------------------------------------------------------------------


def test_a_bad_encode_fails_its_request(loaded):
    router, dp, enc, _, _ = build(loaded)
    where = {"prefill_id": "P", "prefill_address": "P", "prefill_dataplane": dp["P"].descriptor()}
    enc.on_encode(Encode(request_id="none", items=[], **where), [])
    enc.on_encode(Encode(request_id="far", items=[MMItem(hash="h", frame=3)], **where), [Frame(b"x")])
    enc.on_encode(Encode(request_id="many", items=[MMItem(hash="h", frame=0)] * 300, **where), [Frame(b"x")])
    assert [(e.request_id, e.status) for e in router.to_gateway_log] == [
        ("none", 400),
        ("far", 400),
        ("many", 400),
    ]
    assert "items" in errors(router, "none")[0].message and "frame 3" in errors(router, "far")[0].message
    assert not enc.queue and enc.refusals.total == 3


# ---- a step that raises anyway ---------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_step_that_raises_fails_its_requests_and_the_next_request_is_served(loaded, tiny_qwen2_vl, stage):
    router, dp, enc, pre, dec = build(loaded)
    engine = pre.engine if stage == "prefill" else dec.engine
    execute, calls = engine.runner.execute, []

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the device fell over")
        return execute(*args, **kwargs)

    engine.runner.execute = broken_once
    data, h, item, ids, params = request(loaded, "a", make_image(140, 100))
    tokens = run(router, enc, pre, dec, loaded, dp, "a", data, h, item, ids, params)
    assert len(tokens) <= 1, "at most the first token comes before the failed step"
    failed = errors(router, "a")
    assert failed and failed[0].status == 500 and "the device fell over" in failed[0].message
    dec.on_abort("a")  # what the gateway sends every instance holding the request on that error
    for bm in (pre.engine.block_manager, dec.engine.block_manager):
        assert bm.num_free_blocks == bm.num_blocks, f"{stage}: the failed step's blocks were not freed"
    expected, _ = hf_greedy(tiny_qwen2_vl, loaded.family, ids, [item], 10)
    assert run(router, enc, pre, dec, loaded, dp, "b", data, h, item, ids, params) == expected


# ---- real stage processes --------------------------------------------------------------------------


def test_a_prefill_process_survives_a_token_past_the_vocabulary_and_serves_as_before(loaded, tiny_qwen2_vl):
    """The attack: a PREFILL with token id 10**6 crashed the prefill process inside `engine.step`."""
    ids = text_ids(loaded)
    expected, _ = hf_greedy(tiny_qwen2_vl, loaded.family, ids, [], 6)

    async def go():
        config = StackConfig(
            str(tiny_qwen2_vl), parse_topology("E1 P1 D1"), kv_cache_memory=16, restart=False
        )
        stack = Stack(config)
        await stack.start(http=False)
        ctx = zmq.asyncio.Context()
        forger = Mailbox(ctx, "forger", keys=config.keys)
        try:
            cluster = stack.cluster
            p, d = cluster.registry.with_role("P")[0], cluster.registry.with_role("D")[0]
            forged = prefill("forged", [*ids, 10**6], decode_id=d.id, decode_address=d.address)
            forger.send(p.address, forged)  # straight to the stage, past the gateway
            with pytest.raises(BackendError) as err:
                async for _ in cluster.generate(GenerateRequest("bad", [*ids, 10**6], [], PARAMS)):
                    pass
            answer = []
            async for event in cluster.generate(
                GenerateRequest("good", ids, [], SamplingParams(max_tokens=6))
            ):
                answer += event.token_ids
            alive = [c.poll() is None for c in stack.children]
            return err.value, answer, alive
        finally:
            forger.close()
            ctx.term()
            await stack.stop()

    error, answer, alive = asyncio.run(go())
    assert error.status == 400 and "token_ids: token id 1000000" in error.message, error
    assert alive == [True, True, True], "a stage process died"
    assert answer == expected
