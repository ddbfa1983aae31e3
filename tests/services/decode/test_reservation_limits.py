"""Reservation floods: blocks claimed by KV_RESERVEs whose KV has not arrived are capped in total and
per peer (the connection they came on), so a flood from one peer leaves room for the gateway's real
requests, which are served exactly as before; past a cap a KV_RESERVE fails at once with a 503, and a
second one for a request id already reserved is dropped without touching the first."""

from __future__ import annotations

import pytest
import torch

from common.dataplane import create_dataplane
from common.protocol import KvReserve
from common.sampling_params import SamplingParams
from services.decode.reservations import TOO_MANY, ReservationLimits
from services.decode.worker import DecodeWorker
from services.encode.worker import EncodeWorker
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.memory import size_kv_pool
from services.models.loader import load_model
from services.prefill.worker import PrefillWorker
from tests.reference import hf_greedy, make_image
from tests.services.test_workers import Router, request, run

POOL = 512  # blocks of the decode pool; a context of 1024 tokens is 64 of them


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


def stages(loaded, pool_blocks: int = POOL):
    """Encode, prefill and a decode instance with a pool of `pool_blocks`, wired through a router; KV
    destinations for the forged prefill address go nowhere."""
    fam = loaded.family
    router = Router()
    dp = {r: create_dataplane("fake") for r in "EPD"}
    p_engine = Engine(
        fam, loaded.eos_token_ids, EngineConfig(num_blocks=64, max_model_len=1024), prefill_only=True
    )
    cfg = EngineConfig(num_blocks=pool_blocks, max_model_len=1024)
    d_buffer = torch.frombuffer(dp["D"].allocate("kv", size_kv_pool(fam, cfg).nbytes), dtype=torch.uint8)
    enc = EncodeWorker(fam, router.io("E"), dp["E"])
    pre = PrefillWorker(fam, p_engine, router.io("P"), dp["P"], decodes=False)
    dec = DecodeWorker(Engine(fam, loaded.eos_token_ids, cfg, kv_buffer=d_buffer), router.io("D"), dp["D"])
    router.handlers = {
        "E": lambda m, b: enc.on_feature_dest(m),
        "P": lambda m, b: (pre.on_feature_offer if type(m).__name__ == "FeatureOffer" else pre.on_kv_dest)(m),
        "D": lambda m, b: dec.on_kv_ready(m),
        "nowhere": lambda m, b: None,
    }
    return router, dp, enc, pre, dec


def forge(dec, rid: str, tokens: int, peer: bytes, address: str = "nowhere") -> None:
    msg = KvReserve(request_id=rid, num_prompt_tokens=tokens, params=SamplingParams(),
                    prefill_id="P", prefill_address=address)  # fmt: skip
    msg.sender = "gateway"  # the sender field says anything; the connection it came on does not
    dec.on_kv_reserve(msg, peer=peer)


def refused(router) -> list:
    return [m for m in router.to_gateway_log if type(m).__name__ == "RequestError"]


def test_the_caps_are_shares_of_the_pool_and_at_least_one_context(loaded):
    *_, dec = stages(loaded)
    assert dec.limits == ReservationLimits(total_blocks=384, per_peer_blocks=256)
    *_, small = stages(loaded, pool_blocks=64)  # the pool is one context: a lone long prompt still fits
    assert small.limits == ReservationLimits(total_blocks=64, per_peer_blocks=64)


def test_a_flood_of_forged_reservations_leaves_room_for_a_real_request(loaded, tiny_qwen2_vl):
    router, dp, enc, pre, dec = stages(loaded)
    bm = dec.engine.block_manager
    for i in range(130):  # the attack: 130 reservations of 4 blocks each would hold the whole pool
        forge(dec, f"forged-{i}", 63, peer=b"forger")
    errors = refused(router)
    assert len(dec.receiving) == 64 and len(errors) == 66, (len(dec.receiving), len(errors))
    assert all(e.status == 503 and e.message.startswith(TOO_MANY) for e in errors)
    assert bm.num_free_blocks == POOL - 256 and dec.claims.of(b"forger") == 256

    data, h, item, ids, params = request(loaded, "real", make_image(140, 100))
    expected, _ = hf_greedy(tiny_qwen2_vl, loaded.family, ids, [item], 10)
    assert run(router, enc, pre, dec, loaded, dp, "real", data, h, item, ids, params) == expected
    assert not [e for e in refused(router) if e.request_id == "real"]

    for i in range(130):  # what the gateway's aborts (or the deadline) do to them
        dec.on_abort(f"forged-{i}")
    assert bm.num_free_blocks == bm.num_blocks and dec.claims.total == 0 and not dec.request_ids()


def test_the_total_cap_holds_whatever_the_number_of_peers(loaded):
    router, *_, dec = stages(loaded)
    for peer, count in ((b"a", 64), (b"b", 32)):  # 256 + 128 blocks: the whole total of 384
        for i in range(count):
            forge(dec, f"{peer.decode()}-{i}", 64, peer=peer)
    assert not refused(router) and dec.claims.total == 384
    forge(dec, "c-0", 16, peer=b"c")
    [error] = refused(router)
    assert error.request_id == "c-0" and error.status == 503 and "384 of 384 blocks claimed" in error.message


def test_a_second_reservation_for_the_same_request_is_dropped(loaded):
    router, *_, dec = stages(loaded)
    forge(dec, "x", 40, peer=b"gateway", address="P")
    blocks = list(dec.receiving["x"].pool_blocks)
    forge(dec, "x", 900, peer=b"forger")
    assert not refused(router) and dec.refusals.total == 1
    assert dec.receiving["x"].msg.prefill_address == "P" and dec.receiving["x"].pool_blocks == blocks
    assert dec.claims.total == 3 and dec.claims.of(b"forger") == 0
