"""One request's generation, from backend token events to an OpenAI response, whole or streamed (SSE).

`Generation` turns the backend's token events into text deltas (incremental detokenization, stop
strings, which as in vLLM cannot end the output before `min_tokens` tokens) with their tokens'
logprobs, keeps the timings for TTFT/TPOT, enforces the request deadline, and on `release()` records
its metrics and frees the request: an abort to the backend unless the backend said it finished.
`respond` writes the deltas as a JSON body or as SSE chunks; a chunk carries the logprobs of the
tokens whose text it releases (text held back, half a character or the start of a stop string, keeps
its logprobs for the chunk that releases it), so the chunks' logprobs add up to the whole response's.

Errors and the HTTP status: a stream's headers are only sent once the first event arrived, so a request
the backend cannot place (503, say) still gets its real status and an error body. After that the
status is 200 for good; a later failure becomes an SSE error event (`data: {"error": ...}`) followed by
`data: [DONE]`: never a stream that just stops, nor a 200 that looks complete.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiohttp import web

from common.detokenizer import IncrementalDetokenizer
from gateway.backend import Backend, BackendError, GenerateRequest, TokenEvent
from gateway.errors import error_body
from gateway.logprobs_format import LogprobTexts, TokenLogprob
from gateway.metrics import GatewayMetrics
from gateway.responses import ResponseFormat, Usage

log = structlog.get_logger("gateway")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first


@dataclass(slots=True)
class Delta:
    text: str
    finish_reason: str | None = None  # set on the last delta only
    logprobs: list[TokenLogprob] | None = None  # of this event's tokens; None: the request asked for none


class ClientGone(Exception):
    """The client closed the connection before the response was complete."""


class Generation:
    def __init__(
        self,
        backend: Backend,
        request: GenerateRequest,
        tokenizer: Any,
        metrics: GatewayMetrics,
        *,
        arrival: float,
        deadline: float | None,
        background: set[asyncio.Task[None]],
    ) -> None:
        self.backend = backend
        self.request = request
        self.metrics = metrics
        self.arrival = arrival
        self.deadline = deadline  # time.monotonic() value, or None
        self._background = background  # keeps release tasks referenced until they end
        self._detok = IncrementalDetokenizer(tokenizer, request.params.stop)
        self._logprobs = None if request.params.logprobs is None else LogprobTexts(tokenizer)
        self._events: AsyncIterator[TokenEvent] | None = None
        self._backend_finished = False  # saw finished=True: nothing left to abort
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.cached_tokens = 0  # from the first event: prompt tokens served from the prefix cache
        self._release_task: asyncio.Task[None] | None = None  # set by release(), once
        metrics.running.inc()

    @property
    def usage(self) -> Usage:
        """Tokens up to the one that completed a stop string, EOS included when the backend sent it."""
        return Usage(len(self.request.token_ids), len(self._detok.token_ids), self.cached_tokens)

    async def next_delta(self) -> Delta:
        """Text of the next backend event; the last delta carries the finish reason. Raises BackendError."""
        if self.finish_reason is not None:
            raise RuntimeError("the generation has already finished")
        event = await self._next_event()
        if event.token_ids:
            self.last_token_at = time.monotonic()
            self.first_token_at = self.first_token_at or self.last_token_at
        self.cached_tokens = max(self.cached_tokens, event.num_cached_tokens)
        before = len(self._detok.token_ids)
        stopped = self._push(event.token_ids)
        logprobs = None
        if self._logprobs is not None:  # the tokens the detokenizer took (a stop string may end it early)
            logprobs = self._logprobs.entries(self._detok.token_ids[before:], event.logprobs)
        self._backend_finished = event.finished
        if stopped or event.finished:
            self.finish_reason = "stop" if stopped else (event.finish_reason or "stop")
            return Delta(self._detok.new_text(final=True), self.finish_reason, logprobs)
        return Delta(self._detok.new_text(), logprobs=logprobs)

    def _push(self, token_ids: list[int]) -> bool:
        """Detokenize; the first `min_tokens` tokens' text is not searched for stop strings (vLLM)."""
        detok = self._detok
        early = self.request.params.min_tokens - len(detok.token_ids)
        if early <= 0 or not detok.stop:
            return detok.push(token_ids)
        stop, detok.stop = detok.stop, []
        try:
            detok.push(token_ids[:early])
        finally:
            detok.stop = stop
        return detok.push(token_ids[early:])

    async def _next_event(self) -> TokenEvent:
        if self._events is None:
            events: Any = self.backend.generate(self.request)
            self._events = await events if inspect.isawaitable(events) else events
        try:
            if self.deadline is None:
                return await anext(self._events)
            if sys.version_info >= (3, 11):  # a timeout scope: no extra task per event
                async with asyncio.timeout_at(_loop_time(self.deadline)):
                    return await anext(self._events)
            return await asyncio.wait_for(anext(self._events), self.deadline - time.monotonic())
        except StopAsyncIteration:
            raise BackendError(502, "the backend ended the request without a finish reason") from None
        except asyncio.TimeoutError:
            raise BackendError(504, f"the request did not finish within {self._timeout_s():g} s") from None

    def _timeout_s(self) -> float:
        return 0.0 if self.deadline is None else self.deadline - self.arrival

    def release(self) -> asyncio.Task[None]:
        """Record the generation's metrics and start releasing the request (abort unless finished);
        later calls return the same task.

        Nothing here awaits: a handler cancelled at any point (its client went away, even right after
        `[DONE]`) has still done all of it once this returns. The release runs in its own task, kept in
        `background` until it ends, so it is never cut short by the handler's cancellation.
        """
        if self._release_task is not None:
            return self._release_task
        task = self._release_task = asyncio.ensure_future(self._release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self.metrics.running.dec()
        self._record()
        return task

    def _record(self) -> None:
        tokens = self.usage.completion_tokens
        first, last = self.first_token_at, self.last_token_at
        tpot = None
        if first is not None and last is not None and tokens > 1:
            tpot = (last - first) / (tokens - 1)
        self.metrics.record_generation(
            prompt_tokens=len(self.request.token_ids),
            output_tokens=tokens,
            ttft=None if first is None else first - self.arrival,
            tpot=tpot,
            e2e=time.monotonic() - self.arrival,
        )
        slo = getattr(self.backend, "slo", None)  # the planner's window (gateway/planner_slo.py)
        if first is not None and slo is not None:
            slo.record(first - self.arrival, tpot, time.monotonic())

    async def _release(self) -> None:
        request_id = self.request.request_id
        try:
            if not self._backend_finished:
                await self.backend.abort(request_id)
        except Exception:
            log.exception("backend abort failed", request_id=request_id)
        finally:  # the event stream is closed even when the abort failed: that is what frees the request
            await self._close_events()

    async def _close_events(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.exception("closing the backend's event stream failed", request_id=self.request.request_id)


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def respond(
    request: web.Request,
    generation: Generation,
    fmt: ResponseFormat,
    *,
    stream: bool,
    headers: dict[str, str],
) -> tuple[web.StreamResponse, int]:
    """Run `generation` to its end into a response; returns it with the outcome status for the metrics.

    The caller must `release()` the generation afterwards (in a `finally`, so cancellation releases it).
    """
    try:
        first = await generation.next_delta()
    except BackendError as exc:
        return _error_response(exc, headers)
    if stream:
        return await _stream(request, generation, fmt, first, headers)
    return await _whole(request, generation, fmt, first, headers)


async def _whole(
    request: web.Request, generation: Generation, fmt: ResponseFormat, delta: Delta, headers: dict[str, str]
) -> tuple[web.StreamResponse, int]:
    pieces = [delta.text]
    logprobs = delta.logprobs
    try:
        while delta.finish_reason is None:
            if _client_gone(request):
                raise ClientGone
            delta = await generation.next_delta()
            pieces.append(delta.text)
            if logprobs is not None and delta.logprobs:
                logprobs += delta.logprobs
    except BackendError as exc:
        return _error_response(exc, headers)
    except ClientGone:
        return web.Response(status=CLIENT_GONE), CLIENT_GONE
    body = fmt.full("".join(pieces), delta.finish_reason, generation.usage, logprobs)
    return web.json_response(body, headers=headers), 200


async def _stream(
    request: web.Request, generation: Generation, fmt: ResponseFormat, delta: Delta, headers: dict[str, str]
) -> tuple[web.StreamResponse, int]:
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    status = 200
    try:
        await response.prepare(request)
        if (chunk := fmt.first_chunk()) is not None:
            await _send(response, chunk)
        pending = None  # logprobs of tokens whose text is held back, for the next chunk sent
        while True:
            if delta.logprobs is not None:
                pending = (pending or []) + delta.logprobs
            if delta.text or delta.finish_reason is not None:
                await _send(response, fmt.delta_chunk(delta.text, delta.finish_reason, pending))
                pending = None if pending is None else []
            if delta.finish_reason is not None:
                if fmt.include_usage:
                    await _send(response, fmt.usage_chunk(generation.usage))
                break
            if _client_gone(request):
                raise ClientGone
            try:
                delta = await generation.next_delta()
            except BackendError as exc:  # the 200 is sent: the failure must travel inside the stream
                log.warning("request failed mid-stream", status=exc.status, error=exc.message)
                status = exc.status
                await _send(response, error_body(exc.status, exc.message))
                break
            except Exception:
                log.exception("request failed mid-stream")
                status = 500
                await _send(response, error_body(500, "internal error in the gateway; see its log"))
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ClientGone, ConnectionError):
        status = CLIENT_GONE
    return response, status


def _error_response(exc: BackendError, headers: dict[str, str]) -> tuple[web.StreamResponse, int]:
    body = error_body(exc.status, exc.message)
    return web.json_response(body, status=exc.status, headers=headers), exc.status


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + msgspec.json.encode(payload) + b"\n\n")
