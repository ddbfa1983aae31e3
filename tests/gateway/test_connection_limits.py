"""Connections that never complete a request are closed in time, and open connections are capped: raw
sockets against the gateway as `start_site` serves it, with short limits."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from gateway_helpers import chat_body

from gateway.app import create_app, start_site
from gateway.config import GatewayConfig

pytestmark = pytest.mark.asyncio

SLACK_S = 1.5  # a loaded test machine
HEALTH = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"

Serve = Callable[..., Awaitable[int]]


@pytest_asyncio.fixture
async def serve(model_dir, tokenizer, fake) -> AsyncIterator[Serve]:
    """`await serve(**limits)`: the gateway's port on loopback."""
    runners = []

    async def start(**limits: Any) -> int:
        app = create_app(GatewayConfig(model_dir=model_dir, **limits), fake, tokenizer)
        runner = await start_site(app, "127.0.0.1", 0)
        runners.append(runner)
        return runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


async def connect(port: int, data: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def seconds_until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """How long until the server closed the connection (EOF or reset), and what it sent before; inf
    when it was still open after `limit` seconds."""
    loop = asyncio.get_running_loop()
    start, received = loop.time(), b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), start + limit - loop.time()):
            received += chunk
    except ConnectionError:
        pass
    except asyncio.TimeoutError:
        return math.inf, received
    return loop.time() - start, received


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await asyncio.wait_for(reader.readexactly(length), 10)


async def health_works(port: int) -> None:
    reader, writer = await connect(port, HEALTH)
    status, body = await read_response(reader)
    writer.close()
    assert status == 200 and json.loads(body)["status"] == "ok", body


async def test_a_connection_sending_half_its_headers_is_closed_after_the_header_timeout(serve) -> None:
    port = await serve(header_timeout_s=0.5, keepalive_timeout_s=30)
    reader, writer = await connect(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-")
    waited, received = await seconds_until_closed(reader, 0.5 + SLACK_S)
    assert 0.4 <= waited < 0.5 + SLACK_S and received == b"", f"closed after {waited:.2f} s"
    writer.close()
    await health_works(port)


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(serve) -> None:
    port = await serve(header_timeout_s=0.5, keepalive_timeout_s=30)
    reader, writer = await connect(port)
    waited, _ = await seconds_until_closed(reader, 0.5 + SLACK_S)
    assert 0.4 <= waited < 0.5 + SLACK_S, f"closed after {waited:.2f} s"
    writer.close()
    await health_works(port)


async def test_an_idle_keep_alive_connection_is_closed_and_a_trickling_next_head_too(serve) -> None:
    port = await serve(header_timeout_s=0.6, keepalive_timeout_s=1.0)
    reader, writer = await connect(port, HEALTH)
    assert (await read_response(reader))[0] == 200
    waited, _ = await seconds_until_closed(reader, 1.0 + SLACK_S)
    assert 0.9 <= waited < 1.0 + SLACK_S, f"idle keep-alive connection closed after {waited:.2f} s"
    writer.close()

    reader, writer = await connect(port, HEALTH)
    assert (await read_response(reader))[0] == 200
    writer.write(b"GET /health HTTP/1.1\r\n")  # the next request's head starts, and never ends
    waited, _ = await seconds_until_closed(reader, 0.6 + SLACK_S)
    assert waited < 0.6 + SLACK_S, f"closed after {waited:.2f} s"
    writer.close()


async def test_a_body_that_does_not_arrive_in_time_gets_408(serve) -> None:
    port = await serve(body_timeout_s=0.5)
    body = json.dumps(chat_body(max_tokens=2)).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(body)}\r\n\r\n"
    reader, writer = await connect(port, head.encode() + body[:10])
    status, answer = await read_response(reader)
    assert status == 408 and "did not arrive within 0.5 s" in json.loads(answer)["error"]["message"]
    writer.close()
    await health_works(port)


async def test_connections_beyond_the_cap_get_503_and_are_closed(serve) -> None:
    port = await serve(max_connections=3, header_timeout_s=30)
    held = [await connect(port) for _ in range(3)]
    await asyncio.sleep(0.1)  # the server has accepted them
    reader, writer = await connect(port)
    status, body = await read_response(reader)
    assert status == 503 and "too many open connections" in json.loads(body)["error"]["message"]
    waited, _ = await seconds_until_closed(reader, SLACK_S)
    assert waited < SLACK_S
    writer.close()

    for _, w in held[1:]:
        w.close()
    await asyncio.sleep(0.2)  # the server saw them go
    reader, writer = await connect(port, HEALTH + b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    status, metrics = await read_response(reader)
    assert status == 200
    assert b"\nepd_gateway_open_connections 2.0\n" in metrics, "the held one and this one"
    assert b'\nepd_gateway_connections_closed_total{reason="limit"} 1.0\n' in metrics
    writer.close()
    held[0][1].close()
