"""One streamed chat request and what the benchmark needs from it: when each piece of text arrived.

Plain aiohttp rather than the openai SDK: the SDK parses every chunk into pydantic objects, and at a
few hundred chunks per second that overhead lands in the very inter-token gaps being measured. Here a
chunk is one `json.loads` and a timestamp taken as soon as its line is read.

What counts as a failure: a non-200 answer, an SSE `{"error": ...}` event (the gateway's way to fail a
stream after its 200 was sent), a stream that ends without `[DONE]`, or a connection error or
timeout. Each keeps its message, so a table of failures says why.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.serve.dataset import BenchRequest


@dataclass(slots=True)
class RequestRecord:
    """The timeline of one request; times are `time.perf_counter()` seconds."""

    index: int
    start: float  # just before the request was sent
    end: float = 0.0  # when the stream ended (or failed)
    chunk_times: list[float] = field(default_factory=list)  # each chunk that carried text
    first_choice_time: float | None = None  # first chunk with choices, text or not (TTFT fallback)
    prompt_tokens: int = 0  # from usage
    output_tokens: int = 0  # from usage
    success: bool = False
    error: str = ""
    images: int = 0

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first text (or, if no chunk had text, the first choice)."""
        first = self.chunk_times[0] if self.chunk_times else self.first_choice_time
        return None if first is None else first - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive text chunks (one chunk may carry more than one token)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(payload)


async def _read_error(response: aiohttp.ClientResponse) -> str:
    text = await response.text(errors="replace")
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = text.strip()[:500]
    return f"HTTP {response.status}: {message}"


async def _consume(response: aiohttp.ClientResponse, record: RequestRecord) -> None:
    """Read the SSE stream into `record`; sets success only on a clean `[DONE]`."""
    async for raw in response.content:
        now = time.perf_counter()
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, other fields
        data = line[5:].strip()
        if data == b"[DONE]":
            record.success = not record.error
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            record.error = f"malformed SSE data: {data[:200]!r}"
            return
        if "error" in chunk:
            record.error = _error_message(chunk)
            continue  # the gateway still sends [DONE]; the request stays failed
        if chunk.get("usage"):
            record.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
            record.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        choices = chunk.get("choices") or []
        if not choices:
            continue
        if record.first_choice_time is None:
            record.first_choice_time = now
        delta = choices[0].get("delta") or {}
        if delta.get("content"):
            record.chunk_times.append(now)
    record.error = record.error or "the stream ended without [DONE]"


async def send_request(
    session: aiohttp.ClientSession, url: str, body: bytes, request: BenchRequest, timeout: float
) -> RequestRecord:
    """POST one streamed chat completion to `url` and time it; never raises (errors go in the record).

    `body` is `request.payload(model)` already encoded, so that encoding is not timed.
    """
    record = RequestRecord(index=request.index, start=time.perf_counter(), images=len(request.images))
    try:
        async with session.post(
            url,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),  # the whole request, stream included
        ) as response:
            if response.status != 200:
                record.error = await _read_error(response)
            else:
                await _consume(response, record)
    except asyncio.TimeoutError:
        record.error = f"no complete answer within {timeout:g} s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: an over-long SSE line
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = time.perf_counter()
    if record.success and record.output_tokens == 0:
        record.output_tokens = len(record.chunk_times)  # a server without usage: count text chunks
    return record
