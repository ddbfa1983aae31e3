"""The bench client and load loops against a small scripted SSE server (no model, milliseconds)."""

from __future__ import annotations

import asyncio
import json
import math
import time

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from bench.serve.client import send_request
from bench.serve.dataset import BenchRequest
from bench.serve.load import LoadPoint, run_load
from bench.serve.target import is_loopback, served_model

STEP = 0.004  # seconds between tokens


class Script:
    """An OpenAI-shaped chat endpoint whose behaviour the prompt picks; counts requests in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["messages"][0]["content"][-1]["text"]
        if prompt == "refuse":
            return web.json_response({"error": {"message": "no decode instance", "code": 503}}, status=503)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)

            async def send(payload: dict) -> None:
                await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

            await asyncio.sleep(STEP * 3)  # "prefill"
            await send(
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}
            )
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(STEP)
                if prompt == "break" and i == 2:
                    await send({"error": {"message": "decode instance lost", "code": 502}})
                    break
                await send({"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]})
            else:
                await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
                await send(
                    {"choices": [], "usage": {"prompt_tokens": 17, "completion_tokens": body["max_tokens"]}}
                )
            if prompt != "cut":
                await response.write(b"data: [DONE]\n\n")
            return response
        finally:
            self.in_flight -= 1

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted", "object": "model"}]})


@pytest_asyncio.fixture
async def server():
    script = Script()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", script.chat)
    app.router.add_get("/v1/models", script.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        yield script, session, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


def req(index: int, prompt: str = "hello", output_len: int = 5) -> BenchRequest:
    return BenchRequest(index=index, prompt=prompt, prompt_words=1, output_len=output_len)


async def call(session, base: str, r: BenchRequest):
    return await send_request(
        session, base + "/chat/completions", json.dumps(r.payload("scripted")).encode(), r, 10
    )


@pytest.mark.asyncio
async def test_a_streamed_request_is_timed_chunk_by_chunk(server):
    _, session, base = server
    assert await served_model(session, base) == "scripted"
    await call(session, base, req(0, output_len=2))  # first calls pay for lazy set-up on both ends
    rec = await call(session, base, req(1, output_len=6))
    assert rec.success and rec.error == ""
    assert rec.output_tokens == 6 and rec.prompt_tokens == 17
    assert len(rec.chunk_times) == 6 and len(rec.itls) == 5  # the role chunk carries no text
    assert rec.ttft >= STEP * 3 and all(gap >= STEP * 0.5 for gap in rec.itls)
    assert rec.tpot == pytest.approx((rec.e2e - rec.ttft) / 5)


@pytest.mark.asyncio
async def test_failures_keep_their_message(server):
    _, session, base = server
    refused, broken, cut = [
        await call(session, base, req(i, p)) for i, p in enumerate(["refuse", "break", "cut"])
    ]
    assert not refused.success and refused.error == "HTTP 503: no decode instance"
    assert not broken.success and broken.error == "decode instance lost"
    assert not cut.success and "without [DONE]" in cut.error
    down = await send_request(session, "http://127.0.0.1:9/v1/chat/completions", b"{}", req(3), 5)
    assert not down.success and "Connect" in down.error


@pytest.mark.asyncio
async def test_open_loop_poisson_arrivals_and_burst(server):
    _, session, base = server
    requests = [req(i, output_len=3) for i in range(20)]
    result = await run_load(lambda r: call(session, base, r), requests, LoadPoint(rate=100.0), seed=1)
    assert [r.index for r in result.records] == list(range(20)) and all(r.success for r in result.records)
    starts = [r.start for r in result.records]
    assert starts == sorted(starts) and 0.05 < starts[-1] - starts[0] < 1.0  # about 19 gaps of 10 ms
    again = await run_load(lambda r: call(session, base, r), requests, LoadPoint(rate=100.0), seed=1)
    gaps = [b.start - a.start for a, b in zip(result.records, result.records[1:], strict=False)]
    gaps2 = [b.start - a.start for a, b in zip(again.records, again.records[1:], strict=False)]
    assert (
        max(abs(x - y) for x, y in zip(gaps, gaps2, strict=True)) < 0.02
    )  # the same arrivals for the same seed
    burst = await run_load(lambda r: call(session, base, r), requests, LoadPoint(rate=math.inf))
    assert max(r.start for r in burst.records) - min(r.start for r in burst.records) < 0.05


@pytest.mark.asyncio
async def test_closed_loop_and_caps_bound_what_is_in_flight(server):
    script, session, base = server
    requests = [req(i, output_len=3) for i in range(12)]
    result = await run_load(lambda r: call(session, base, r), requests, LoadPoint(rate=None, concurrency=3))
    assert len(result.records) == 12 and script.max_in_flight == 3
    script.max_in_flight = 0
    await run_load(lambda r: call(session, base, r), requests, LoadPoint(rate=math.inf, concurrency=2))
    assert script.max_in_flight == 2


@pytest.mark.asyncio
async def test_duration_cap_stops_new_requests(server):
    _, session, base = server
    requests = [req(i, output_len=2) for i in range(500)]
    t0 = time.perf_counter()
    result = await run_load(
        lambda r: call(session, base, r), requests, LoadPoint(rate=50.0), max_duration=0.2
    )
    assert 2 <= len(result.records) < 30 and time.perf_counter() - t0 < 2.0


def test_only_loopback_by_default():
    assert is_loopback("http://127.0.0.1:8000/v1") and is_loopback("http://localhost:1/v1")
    assert is_loopback("http://[::1]:8000/v1")
    assert not is_loopback("http://10.0.0.2:8000/v1") and not is_loopback("http://example.com/v1")
