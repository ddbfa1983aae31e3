"""The stage workers wired in one process through a message router and fake data planes: the protocol
logic (offers, destinations, layer-by-layer KV, admission, aborts) without sockets or timing."""

from __future__ import annotations

import io

import pytest
import torch

from common.dataplane import create_dataplane
from common.hashing import content_hash
from common.prompting import chat_prompt_ids
from common.protocol import Abort, Encode, KvReserve, MMItem, MMRef, Prefill
from common.sampling_params import SamplingParams
from services.decode.worker import DecodeWorker
from services.encode.worker import EncodeWorker
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.memory import size_kv_pool
from services.models.loader import load_model
from services.prefill.worker import PrefillWorker
from tests.reference import hf_greedy, make_image


class Router:
    """Delivers messages between in-process workers by address; records what reaches the gateway."""

    def __init__(self):
        self.handlers = {}
        self.queue = []
        self.to_gateway_log = []

    def io(self, name):
        router = self

        class IO:
            address = name

            def send(self, address, msg, buffers=()):
                msg.sender = name
                router.queue.append((address, msg, list(buffers)))

            def to_gateway(self, msg, buffers=()):
                router.to_gateway_log.append(msg)

            def wake(self, *_):
                pass  # the test drives the loop itself

        return IO()

    def pump(self):
        while self.queue:
            address, msg, buffers = self.queue.pop(0)
            self.handlers[address](msg, buffers)


class Frame:
    def __init__(self, data):
        self.buffer = memoryview(data)


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


def build(loaded):
    fam = loaded.family
    router = Router()
    dp = {r: create_dataplane("fake") for r in "EPD"}
    cfg = EngineConfig(num_blocks=64, max_model_len=1024)
    p_engine = Engine(fam, loaded.eos_token_ids, cfg, prefill_only=True)
    kv_bytes = size_kv_pool(fam, cfg).nbytes  # the decode pool lives in data-plane memory
    d_buffer = torch.frombuffer(dp["D"].allocate("kv", kv_bytes), dtype=torch.uint8)
    d_engine = Engine(fam, loaded.eos_token_ids, cfg, kv_buffer=d_buffer)
    enc = EncodeWorker(fam, router.io("E"), dp["E"])
    pre = PrefillWorker(fam, p_engine, router.io("P"), dp["P"], decodes=False)
    dec = DecodeWorker(d_engine, router.io("D"), dp["D"])
    router.handlers = {
        "E": lambda m, b: enc.on_feature_dest(m),
        "P": lambda m, b: (pre.features.on_offer if type(m).__name__ == "FeatureOffer" else pre.on_kv_dest)(
            m
        ),
        "D": lambda m, b: dec.on_kv_ready(m),
    }
    return router, dp, enc, pre, dec


def request(loaded, rid, image, max_tokens=10):
    fam = loaded.family
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    item = fam.preprocess(image)
    ids = chat_prompt_ids(
        loaded.tokenizer, "What is in this picture?", fam.image_token_id, [fam.num_image_tokens(item)]
    )
    params = SamplingParams(max_tokens=max_tokens)
    h = content_hash(data)
    return data, h, item, ids, params


def run(router, enc, pre, dec, loaded, dp, rid, data, h, item, ids, params):
    dec.on_kv_reserve(KvReserve(request_id=rid, num_prompt_tokens=len(ids), params=params,
                                prefill_id="P", prefill_address="P"))  # fmt: skip
    enc.on_encode(
        Encode(request_id=rid, items=[MMItem(hash=h, frame=0)], prefill_id="P", prefill_address="P",
               prefill_dataplane=dp["P"].descriptor()),
        [Frame(data)],
    )  # fmt: skip
    pre.on_prefill(Prefill(request_id=rid, token_ids=ids, params=params, decode_id="D", decode_address="D",
                           mm=[MMRef(hash=h, grid_thw=item.grid_thw, num_tokens=len(ids))]))  # fmt: skip
    for _ in range(200):
        router.pump()
        for w in (enc, pre, dec):
            w.poll()
        if enc.has_work():
            enc.run_batch()
        if pre.has_work():
            pre.step()
        router.pump()
        if dec.has_work():
            dec.step()
    first = [m for m in router.to_gateway_log if type(m).__name__ == "FirstToken" and m.request_id == rid]
    rest = [
        t for m in router.to_gateway_log if type(m).__name__ == "Tokens" for u in m.updates
        if u.request_id == rid for t in u.token_ids
    ]  # fmt: skip
    return [first[0].token_id, *rest] if first else []


def test_split_workers_match_transformers_and_repeat_images_do_not_move_again(loaded, tiny_qwen2_vl):
    router, dp, enc, pre, dec = build(loaded)
    data, h, item, ids, params = request(loaded, "a", make_image(140, 100))
    expected, _ = hf_greedy(tiny_qwen2_vl, loaded.family, ids, [item], 10)
    assert run(router, enc, pre, dec, loaded, dp, "a", data, h, item, ids, params) == expected
    received = pre.features.bytes_received
    assert received > 0 and enc.items_encoded == 1

    # the same image again: the encoder's cache answers, prefill already holds it, nothing moves
    assert run(router, enc, pre, dec, loaded, dp, "b", data, h, item, ids, params) == expected
    assert enc.items_encoded == 1
    assert pre.features.bytes_received == received
    bm_p, bm_d = pre.engine.block_manager, dec.engine.block_manager
    assert bm_p.num_free_blocks == bm_p.num_blocks and bm_d.num_free_blocks == bm_d.num_blocks


def test_abort_while_reserved_frees_decode_blocks(loaded):
    router, dp, enc, pre, dec = build(loaded)
    data, h, item, ids, params = request(loaded, "x", make_image(56, 56))
    bm = dec.engine.block_manager
    dec.on_kv_reserve(KvReserve(request_id="x", num_prompt_tokens=len(ids), params=params,
                                prefill_id="P", prefill_address="P"))  # fmt: skip
    assert bm.num_free_blocks < bm.num_blocks and "x" in dec.receiving
    dec.on_abort(Abort(request_id="x").request_id)
    assert bm.num_free_blocks == bm.num_blocks and not dec.receiving


def test_prefill_times_out_without_features(loaded):
    router, dp, enc, pre, dec = build(loaded)
    _, h, item, ids, params = request(loaded, "late", make_image(56, 56))
    pre.on_prefill(Prefill(request_id="late", token_ids=ids, params=params, decode_id="D", decode_address="D",
                           mm=[MMRef(hash=h, grid_thw=item.grid_thw, num_tokens=4)], deadline_s=0.0))  # fmt: skip
    pre.poll()
    errors = [m for m in router.to_gateway_log if type(m).__name__ == "RequestError"]
    assert errors and errors[0].status == 504 and "timed out waiting for the features" in errors[0].message
    assert not pre.waiting
