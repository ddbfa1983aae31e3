"""A decode instance hands a request, with its KV, to another mid-generation (services/decode/handoff.py).

The workers run in one process through the message router of tests/services/test_workers.py: encode,
prefill, and two decode instances. The request is moved after a few tokens; what comes out of both
must be transformers' greedy answer (and, sampled with a seed, the tokens of a run that never moved),
every TOKENS update must name its place in the output (what the gateway orders them by), and the
source's blocks must all be free once the KV has gone.
"""

from __future__ import annotations

import pytest
import torch

from common.dataplane import create_dataplane
from common.protocol import Encode, Handoff, KvReserve, MMItem, MMRef, Prefill
from common.sampling_params import SamplingParams
from services.decode.worker import DecodeWorker
from services.encode.worker import EncodeWorker
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.memory import size_kv_pool
from services.models.loader import load_model
from services.prefill.worker import PrefillWorker
from tests.reference import hf_greedy, make_image
from tests.services.test_workers import Frame, Router, request

MAX_TOKENS = 14


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


def _io(router: Router, name: str):
    io = router.io(name)
    io.name = name  # the instance id a hand-off names itself by
    return io


def _stack(loaded):
    fam, router = loaded.family, Router()
    dp = {r: create_dataplane("fake") for r in ("E", "P", "D1", "D2")}
    cfg = EngineConfig(num_blocks=64, max_model_len=1024)
    enc = EncodeWorker(fam, _io(router, "E"), dp["E"])
    pre = PrefillWorker(fam, Engine(fam, loaded.eos_token_ids, cfg, prefill_only=True), _io(router, "P"),
                        dp["P"], decodes=False)  # fmt: skip
    decodes = {}
    for name in ("D1", "D2"):
        pool = torch.frombuffer(dp[name].allocate("kv", size_kv_pool(fam, cfg).nbytes), dtype=torch.uint8)
        engine = Engine(fam, loaded.eos_token_ids, cfg, kv_buffer=pool)
        decodes[name] = DecodeWorker(engine, _io(router, name), dp[name])

    def to_decode(name):
        d = decodes[name]
        kinds = {"KvReserve": d.on_kv_reserve, "KvReady": d.on_kv_ready, "KvDest": d.on_kv_dest}
        return lambda m, b: kinds[type(m).__name__](m)

    router.handlers = {
        "E": lambda m, b: enc.on_feature_dest(m),
        "P": lambda m, b: (pre.features.on_offer if type(m).__name__ == "FeatureOffer" else pre.on_kv_dest)(m),
        "D1": to_decode("D1"),
        "D2": to_decode("D2"),
    }  # fmt: skip
    return router, dp, enc, pre, decodes


def _generate(loaded, params: SamplingParams, move_after: int | None) -> tuple[list[int], dict]:
    """Tokens of one request decoded on D1, moved to D2 after `move_after` of them (None: never)."""
    router, dp, enc, pre, decodes = _stack(loaded)
    data, h, item, ids, _ = request(loaded, "r", make_image(84, 56))
    decodes["D1"].on_kv_reserve(KvReserve(request_id="r", num_prompt_tokens=len(ids), params=params,
                                          prefill_id="P", prefill_address="P"))  # fmt: skip
    enc.on_encode(Encode(request_id="r", items=[MMItem(hash=h, frame=0)], prefill_id="P", prefill_address="P",
                         prefill_dataplane=dp["P"].descriptor()), [Frame(data)])  # fmt: skip
    pre.on_prefill(Prefill(request_id="r", token_ids=ids, params=params, decode_id="D1", decode_address="D1",
                           mm=[MMRef(hash=h, grid_thw=item.grid_thw, num_tokens=len(ids))]))  # fmt: skip
    tokens: list[int] = []
    seen = 0
    for _ in range(300):
        router.pump()
        for w in (enc, pre, *decodes.values()):
            w.poll()
        if enc.has_work():
            enc.run_batch()
        if pre.has_work():
            pre.step()
        router.pump()
        for d in decodes.values():
            if d.has_work():
                d.step()
        for m in router.to_gateway_log[seen:]:
            kind = type(m).__name__
            assert kind in ("FirstToken", "Tokens"), m
            if kind == "FirstToken":
                tokens.append(m.token_id)
                continue
            for u in m.updates:  # each names its place in the output, before and after the move
                assert u.position == len(tokens), (u.position, len(tokens))
                tokens += u.token_ids
        seen = len(router.to_gateway_log)
        if move_after is not None and len(tokens) >= move_after:
            decodes["D1"].on_handoff(Handoff(request_id="r", decode_id="D2", decode_address="D2"))
            move_after = None
    return tokens, {"ids": ids, "item": item, "decodes": decodes}


def test_a_request_moved_mid_decode_goes_on_as_transformers_and_frees_the_source(loaded, tiny_qwen2_vl):
    tokens, run = _generate(loaded, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), move_after=5)
    expected, _ = hf_greedy(tiny_qwen2_vl, loaded.family, run["ids"], [run["item"]], MAX_TOKENS)
    assert tokens == expected[:MAX_TOKENS] and len(tokens) == MAX_TOKENS
    d1, d2 = run["decodes"]["D1"], run["decodes"]["D2"]
    assert d1.handoffs.moved == 1 and not d1.request_ids() and not d2.request_ids()
    for d in (d1, d2):  # the source let go of the moved KV; the target of the finished request's
        assert d.engine.block_manager.num_free_blocks == d.engine.block_manager.num_blocks


def test_seeded_sampling_draws_the_same_tokens_after_a_move(loaded):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=7, ignore_eos=True)
    stayed, _ = _generate(loaded, params, move_after=None)
    moved, run = _generate(loaded, params, move_after=4)
    assert run["decodes"]["D1"].handoffs.moved == 1
    assert moved == stayed and len(moved) == MAX_TOKENS


def test_a_hand_off_asked_after_the_request_ended_is_forgotten_at_once(loaded):
    """The gateway may ask while the last token is on its way: the source must not wait for a
    request it no longer holds (it would stay busy, and its role change would wait, for the timeout)."""
    tokens, run = _generate(
        loaded, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), move_after=MAX_TOKENS
    )
    d1 = run["decodes"]["D1"]
    assert len(tokens) == MAX_TOKENS and d1.handoffs.moved == 0
    assert not d1.handoffs.waiting and d1.idle()
