"""Real stage processes on loopback behind the gateway's cluster backend (no HTTP): every data plane
moves features and KV so that the tokens equal transformers' generate; aborts free the KV blocks."""

from __future__ import annotations

import asyncio
import io

import pytest

from cli.stack import Stack, StackConfig
from common.dataplane.mooncake import unavailable_reason as mooncake_missing
from common.dataplane.nixl import unavailable_reason as nixl_missing
from common.hashing import content_hash
from common.prompting import chat_prompt_ids
from common.sampling_params import SamplingParams
from common.topology import parse_topology
from common.vision_geometry import VisionGeometry
from gateway.backend import GenerateRequest, ImageInput
from services.models.loader import load_model
from tests.reference import hf_greedy, make_image

needs_mooncake = pytest.mark.skipif(bool(mooncake_missing()), reason=str(mooncake_missing()))
needs_nixl = pytest.mark.skipif(bool(nixl_missing()), reason=str(nixl_missing()))


def request_with_image(model_dir, tokenizer, rid, width, height, seed, max_tokens=12):
    img = make_image(width, height, seed)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    geo = VisionGeometry.from_dir(model_dir)
    n = geo.num_tokens(width, height)
    ids = chat_prompt_ids(
        tokenizer, "What is in this picture?", tokenizer.convert_tokens_to_ids("<|image_pad|>"), [n]
    )
    image = ImageInput(content_hash(data), data, width, height, geo.grid(width, height), n)
    return GenerateRequest(rid, ids, [image], SamplingParams(max_tokens=max_tokens)), img


async def collect(cluster, request):
    tokens = []
    async for event in cluster.generate(request):
        tokens += event.token_ids
    return tokens


@pytest.mark.parametrize(
    ("dataplane", "family"),
    [("shm", "qwen2_vl"), ("tcp", "qwen2_vl"), ("cudaipc", "qwen2_vl"), ("torchdist", "qwen2_vl")]
    + [("shm", "qwen2_5_vl")]
    + [pytest.param("mooncake", "qwen2_vl", marks=needs_mooncake)]
    + [pytest.param("nixl", "qwen2_vl", marks=needs_nixl)],
)
def test_every_dataplane_gives_transformers_tokens(dataplane, family, request):
    checkpoint = request.getfixturevalue(f"tiny_{family}")
    loaded = load_model(checkpoint)
    requests = [
        request_with_image(checkpoint, loaded.tokenizer, f"r{i}", 84 + 28 * i, 112, i) for i in range(3)
    ]
    expected = []
    for req, img in requests:
        item = loaded.family.preprocess(img)
        expected.append(hf_greedy(checkpoint, loaded.family, req.token_ids, [item], 12)[0])

    async def run():
        config = StackConfig(
            str(checkpoint), parse_topology("E1 P1 D1"), dataplane=dataplane, kv_cache_memory=16
        )
        stack = Stack(config)
        try:
            await stack.start(http=False)
            return await asyncio.gather(*(collect(stack.cluster, r) for r, _ in requests))
        finally:
            await stack.stop()

    assert asyncio.run(run()) == expected


def test_a_bfloat16_encoder_process_feeds_a_float32_prefill(tiny_qwen2_vl):
    """The encode process casts its tower (--encoder-dtype): bfloat16 features cross the data plane
    and enter the float32 prompt as transformers' own cast would put them."""
    loaded = load_model(tiny_qwen2_vl)
    req, img = request_with_image(tiny_qwen2_vl, loaded.tokenizer, "bf16", 112, 84, 7)
    item = loaded.family.preprocess(img)
    expected = hf_greedy(tiny_qwen2_vl, loaded.family, req.token_ids, [item], 12, encoder_dtype="bfloat16")[0]

    async def run():
        config = StackConfig(
            str(tiny_qwen2_vl), parse_topology("E1 P1 D1"), dataplane="shm", kv_cache_memory=16,
            encoder_dtype="bfloat16",
        )  # fmt: skip
        stack = Stack(config)
        try:
            await stack.start(http=False)
            return await collect(stack.cluster, req)
        finally:
            await stack.stop()

    assert asyncio.run(run()) == expected


def test_abort_mid_decode_frees_the_decode_blocks(tiny_qwen2_vl):
    loaded = load_model(tiny_qwen2_vl)
    req, _ = request_with_image(tiny_qwen2_vl, loaded.tokenizer, "long", 140, 112, 0, max_tokens=2000)
    req.params.ignore_eos = True

    async def run():
        stack = Stack(StackConfig(str(tiny_qwen2_vl), parse_topology("E1 P1 D1"), kv_cache_memory=16))
        try:
            await stack.start(http=False)
            decode = stack.cluster.registry.with_role("D")[0]
            await asyncio.sleep(0.6)
            idle_free = decode.load.free_kv_blocks
            assert idle_free == decode.load.total_kv_blocks > 0
            stream = stack.cluster.generate(req)
            for _ in range(20):  # decoding for real
                await stream.__anext__()
            await asyncio.sleep(0.6)
            assert decode.load.free_kv_blocks < idle_free, "the running request should hold blocks"
            await stream.aclose()  # the client went away
            await stack.cluster.abort(req.request_id)
            for _ in range(50):
                await asyncio.sleep(0.1)
                if decode.load.free_kv_blocks == idle_free:
                    return True
            return decode.load.free_kv_blocks
        finally:
            await stack.stop()

    assert asyncio.run(run()) is True


def test_instances_rejoin_a_restarted_gateway(tiny_qwen2_vl):
    """The gateway forgets everything on restart; the stage processes' next heartbeats are answered
    with "register again", they do, and requests are served as before."""
    from gateway.cluster import Cluster
    from tests.e2e.stack import free_port

    loaded = load_model(tiny_qwen2_vl)
    req, img = request_with_image(tiny_qwen2_vl, loaded.tokenizer, "again", 84, 84, 3, max_tokens=6)
    expected = hf_greedy(tiny_qwen2_vl, loaded.family, req.token_ids, [loaded.family.preprocess(img)], 6)[0]

    async def run():
        port = free_port()
        config = StackConfig(
            str(tiny_qwen2_vl), parse_topology("E1 P1 D1"), control_port=port, kv_cache_memory=16
        )
        stack = Stack(config)
        try:
            await stack.start(http=False)
            await stack.cluster.close()  # the gateway goes away...
            stack.cluster = Cluster(
                stack.cluster.model_name, 4096, f"tcp://127.0.0.1:{port}", keys=config.keys
            )
            await stack.cluster.start()  # ...and comes back knowing nobody
            assert await stack.cluster.wait_for({"E": 1, "P": 1, "D": 1}, 20), "instances did not rejoin"
            return await collect(stack.cluster, req)
        finally:
            await stack.stop()

    assert asyncio.run(run()) == expected
