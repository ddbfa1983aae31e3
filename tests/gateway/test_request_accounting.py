"""Every request is counted, logged once and released, whatever its client does: close right after
`data: [DONE]`, leave mid-stream, leave before the first byte or half-way through its body; and
whatever fails: validation, preprocessing, a stage. Real servers on loopback, raw client sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import structlog
import zmq.asyncio
from aiohttp import web
from fake_backend import SENTENCE, FakeBackend
from gateway_helpers import chat_body
from prometheus_client.parser import text_string_to_metric_families

from common.mailbox import Mailbox
from common.protocol import Abort, FirstToken, InstanceInfo, Prefill, Tokens, TokenUpdate
from gateway.app import BACKGROUND, create_app, start_site
from gateway.backend import BackendError
from gateway.cluster import Cluster
from gateway.config import GatewayConfig
from gateway.preprocess import Preprocessor

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"


@dataclass
class Gateway:
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def heads(self) -> int:
        """Requests aiohttp has parsed and handed to a handler so far (its task exists)."""
        return self.runner.server.requests_count


Serve = Callable[..., Awaitable[Gateway]]


@dataclass
class SlowRelease(FakeBackend):
    """Closing a request's event stream takes a while, as an abort crossing ZeroMQ does on a real
    cluster: that is the window in which a client closing right after [DONE] cancels the handler."""

    release_delay_s: float = 0.05

    async def generate(self, request):  # type: ignore[override]
        events = super().generate(request)
        try:
            async for event in events:
                yield event
        finally:
            await asyncio.sleep(self.release_delay_s)
            await events.aclose()


@pytest_asyncio.fixture
async def serve(model_dir, tokenizer) -> AsyncIterator[Serve]:
    """`await serve(backend, **config)`: the gateway on a free loopback port, as `start_site` runs it."""
    runners = []

    async def start(backend: Any, **overrides: Any) -> Gateway:
        app = create_app(GatewayConfig(model_dir=model_dir, **overrides), backend, tokenizer)
        runner = await start_site(app, "127.0.0.1", 0)
        runners.append(runner)
        return Gateway(app, runner, runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


# -- raw HTTP clients ---------------------------------------------------------------------------------


def post(body: Any, *, declared_length: int | None = None, raw: bytes | None = None) -> bytes:
    payload = raw if raw is not None else json.dumps(body).encode()
    length = len(payload) if declared_length is None else declared_length
    head = f"POST {CHAT} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    return head.encode() + payload


async def connect(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float = 20) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        assert chunk, f"the server closed before {marker!r}; got {seen[-400:]!r}"
        seen += chunk
    return seen


async def hang_up(writer: asyncio.StreamWriter, *, reset: bool = False) -> None:
    """Close at once: a FIN, or with `reset` an RST (SO_LINGER 0 is what abort() amounts to)."""
    if reset:
        writer.transport.abort()
        return
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def request_id(response: bytes) -> str:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"x-request-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no X-Request-Id in {response[:400]!r}")


async def close_after_done(port: int, index: int) -> str:
    reader, writer = await connect(port, post(chat_body(max_tokens=4, stream=True)))
    seen = await read_until(reader, b"data: [DONE]")
    await hang_up(writer, reset=index % 2 == 1)
    return request_id(seen)


async def close_mid_stream(port: int) -> str:
    reader, writer = await connect(port, post(chat_body(max_tokens=200, stream=True)))
    seen = await read_until(reader, b"data: {")
    await hang_up(writer)
    return request_id(seen)


async def answer(port: int, data: bytes) -> int:
    """Send one request on its own connection; the response's status."""
    reader, writer = await connect(port, data)
    status = int((await read_until(reader, b"\r\n")).split(b" ", 2)[1])
    await hang_up(writer)
    return status


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def settle(condition: Callable[[], bool], timeout: float = 3) -> None:
    """Give the server a moment to get there; the caller asserts on what it reached."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:
        await asyncio.sleep(0.01)


async def scrape(port: int) -> list[Any]:
    reader, writer = await connect(
        port, b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
    )
    text = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n\r\n", 1)[1].decode()
    await hang_up(writer)
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Any], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


# -- the tests ----------------------------------------------------------------------------------------


async def test_every_request_is_counted_logged_and_released_whatever_the_client_does(
    serve, tokenizer, monkeypatch
) -> None:
    fake = SlowRelease(text_ids=tokenizer.encode(SENTENCE), eos_id=tokenizer.eos_token_ids[0])
    gateway = await serve(fake)
    app, port = gateway.app, gateway.port
    with structlog.testing.capture_logs() as logs:
        done = await asyncio.gather(*(close_after_done(port, i) for i in range(40)))

        fake.token_delay_s = 0.01
        mid = await asyncio.gather(*(close_mid_stream(port) for _ in range(10)))

        fake.token_delay_s = 5.0  # no first token before the client leaves
        before = [await connect(port, post(chat_body(max_tokens=3, stream=i % 2 == 0))) for i in range(10)]
        await wait_until(lambda: len(fake.requests) == 60, "every waiting request reached the backend")
        for _, writer in before:
            await hang_up(writer)

        heads = gateway.heads
        half = [
            await connect(port, post(None, raw=b'{"messages": [', declared_length=4000)) for _ in range(5)
        ]
        await wait_until(lambda: gateway.heads == heads + 5, "the half bodies are being read")
        for _, writer in half:
            await hang_up(writer)

        fake.token_delay_s = 0.0
        refused = [await answer(port, post(None, raw=b"{not json")) for _ in range(3)]
        fake.fail_before = BackendError(503, "no live decode instance")
        unplaced = [await answer(port, post(chat_body(max_tokens=2))) for _ in range(3)]
        fake.fail_before = None
        monkeypatch.setattr(Preprocessor, "chat", _broken_preprocessing)
        broken = [await answer(port, post(chat_body(max_tokens=2))) for _ in range(2)]

        sent = len(done) + len(mid) + len(before) + len(half) + len(refused) + len(unplaced) + len(broken)
        await wait_until(lambda: not app[BACKGROUND], "every release task ended")
        await settle(lambda: len(done_lines(logs)) >= sent)  # the assertions below say what is missing
    assert refused == [400] * 3 and unplaced == [503] * 3 and broken == [500] * 2

    samples = await scrape(port)
    counted = value(samples, "epd_gateway_requests_total")
    assert counted == sent, f"{sent} requests sent, {counted} counted"
    assert value(samples, "epd_gateway_requests_total", status="499") >= len(mid) + len(before) + len(half)
    assert value(samples, "epd_gateway_requests_total", status="200") <= len(done)
    for status, count in (("400", 3), ("503", 3), ("500", 2)):
        assert value(samples, "epd_gateway_requests_total", status=status) == count, status
    assert value(samples, "epd_gateway_running_requests") == 0
    assert len(done_lines(logs)) == sent, "one 'request done' line per request, no more"

    every = [r.request_id for r in fake.requests]
    assert sorted(fake.closed) == sorted(every), "the backend saw every request's event stream closed"
    assert set(mid) <= set(fake.aborts) and not set(done) & set(fake.aborts)
    assert set(every) - set(done) <= set(fake.aborts), "every request that did not finish was aborted"


def done_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "request done"]


def _broken_preprocessing(self, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a preprocessing bug")


# -- the same over the real cluster backend, with a scripted stage on ZeroMQ --------------------------


class ScriptedStage:
    """One "PD" instance on a real ZeroMQ inbox: answers PREFILL with FIRST_TOKEN, then TOKENS, one every
    `delay_s` (the first token too), up to max_tokens; an ABORT stops it."""

    def __init__(self, ctx: zmq.asyncio.Context, token_id: int) -> None:
        self.mailbox = Mailbox(ctx, "pd0")
        self.token_id = token_id
        self.delay_s = 0.0
        self.prefilled: list[str] = []
        self.aborted: set[str] = set()
        self._streams: dict[str, asyncio.Task] = {}

    async def serve(self, gateway: str) -> None:
        while True:
            msg, _ = await self.mailbox.recv()
            if isinstance(msg, Prefill):
                self.prefilled.append(msg.request_id)
                self._streams[msg.request_id] = asyncio.create_task(self._stream(msg, gateway))
            elif isinstance(msg, Abort):
                self.aborted.add(msg.request_id)
                task = self._streams.pop(msg.request_id, None)
                if task is not None:
                    task.cancel()

    async def _stream(self, msg: Prefill, gateway: str) -> None:
        rid, count = msg.request_id, msg.params.max_tokens
        await asyncio.sleep(self.delay_s)
        first = FirstToken(request_id=rid, token_id=self.token_id, num_prompt_tokens=len(msg.token_ids))
        self.mailbox.send(gateway, first)
        for i in range(1, count):
            await asyncio.sleep(self.delay_s)
            last = i == count - 1
            update = TokenUpdate(
                request_id=rid,
                token_ids=[self.token_id],
                finished=last,
                finish_reason="length" if last else None,
                position=i,
            )
            self.mailbox.send(gateway, Tokens(updates=[update]))


@pytest_asyncio.fixture
async def cluster_with_stage(tokenizer) -> AsyncIterator[tuple[Cluster, ScriptedStage]]:
    cluster = Cluster("tiny", 4096, heartbeat_timeout=600.0)  # no heartbeats here: never expire
    await cluster.start()
    ctx = zmq.asyncio.Context()
    stage = ScriptedStage(ctx, tokenizer.encode(SENTENCE)[0])
    info = InstanceInfo(instance_id="pd0", roles="PD", address=stage.mailbox.address, model="tiny")
    assert cluster.registry.admit(info) == (None, None)
    task = asyncio.create_task(stage.serve(cluster.address))
    yield cluster, stage
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stage.mailbox.close()
    ctx.term()
    await cluster.close()


async def test_the_cluster_frees_every_instance_slot_whatever_the_client_does(
    serve, cluster_with_stage
) -> None:
    cluster, stage = cluster_with_stage
    gateway = await serve(cluster)
    port = gateway.port
    done = await asyncio.gather(*(close_after_done(port, i) for i in range(20)))
    stage.delay_s = 0.01
    mid = await asyncio.gather(*(close_mid_stream(port) for _ in range(5)))
    stage.delay_s = 30.0  # no first token before the client leaves
    before = [await connect(port, post(chat_body(max_tokens=3, stream=True))) for _ in range(5)]
    await wait_until(lambda: len(stage.prefilled) == 30, "the waiting requests reached the stage")
    for _, writer in before:
        await hang_up(writer)

    unfinished = set(stage.prefilled) - set(done)
    await settle(lambda: stage.aborted >= unfinished and not gateway.app[BACKGROUND])
    assert stage.aborted == unfinished, "the stage got an ABORT for exactly the requests that did not finish"
    inflight = cluster.registry.instances["pd0"].inflight
    assert inflight == set(), f"the instance still counts {len(inflight)} requests as placed there"

    samples = await scrape(port)
    assert value(samples, "epd_stage_inflight_requests", instance="pd0") == 0
    assert value(samples, "epd_gateway_requests_total") == 30
    assert value(samples, "epd_gateway_running_requests") == 0
    first_tokens = value(samples, "epd_stage_dispatch_to_first_token_seconds_count", images="no")
    assert first_tokens == len(done) + len(mid), "one dispatch-to-first-token figure per first token"
    decode = value(samples, "epd_stage_first_token_to_decode_seconds_count", placement="colocated")
    assert len(done) <= decode <= len(done) + len(mid), "the clients that left mid-stream may miss it"
