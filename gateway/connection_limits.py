"""Limits on client connections that aiohttp does not have: a deadline for each request head, and a cap
on open connections.

aiohttp's own keep-alive timer (`keepalive_timeout`, set from `GatewayConfig.keepalive_timeout_s`)
closes a connection on which no complete request arrived for that long, from its opening and again
after each response; half a request head does not reset it. Its default is an hour, which is how a few
hundred silent connections can be held. On top of it, each connection here goes through a
`GuardedConnection`, a thin protocol in front of aiohttp's request handler that

- closes the connection when a request head is not complete `header_timeout_s` after the connection
  opened (its first request) or after the first byte of a later request;
- answers 503 and closes at once when `max_connections` are already open.

The request body has its own deadline (`body_timeout_s`), enforced where the handler reads it
(gateway.app), because only the handler knows it wants the body. A connection learns that its head is
complete, and that its response is done, from the `track_requests` middleware.

    guard = ConnectionGuard(header_timeout_s=10, max_connections=4096, metrics=metrics)
    await GuardedSite(runner, host, port, guard).start()
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import cast

import structlog
from aiohttp import web

from gateway.errors import error_body
from gateway.metrics import GatewayMetrics

log = structlog.get_logger("gateway")

ProtocolFactory = Callable[[], asyncio.Protocol]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _busy_response() -> bytes:
    """The whole answer to a connection over the cap: written before any request is read."""
    body = json.dumps(error_body(503, "the gateway has too many open connections; retry later")).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _busy_response()


class ConnectionGuard:
    """The open-connection count and the limits shared by every connection of one site."""

    def __init__(self, *, header_timeout_s: float, max_connections: int, metrics: GatewayMetrics) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.metrics = metrics
        self.open = 0

    def factory(self, server: ProtocolFactory) -> ProtocolFactory:
        """The protocol factory for `loop.create_server`: aiohttp's handlers, each behind a guard."""
        return lambda: GuardedConnection(self, server)

    def admit(self) -> bool:
        if self.open >= self.max_connections:
            self.metrics.connections_closed.labels(reason="limit").inc()
            return False
        self.open += 1
        self.metrics.open_connections.set(self.open)
        return True

    def left(self) -> None:
        self.open -= 1
        self.metrics.open_connections.set(self.open)


class GuardedConnection(asyncio.Protocol):
    """One client connection: forwards everything to aiohttp's handler and holds the head deadline.

    States: waiting for a request head (the deadline runs), serving a request (none), idle after a
    response (none: aiohttp's keep-alive timer runs; the next byte starts the head deadline again).
    """

    def __init__(self, guard: ConnectionGuard, make_handler: ProtocolFactory) -> None:
        self._guard = guard
        self._make_handler = make_handler
        self._handler: asyncio.Protocol | None = None  # None: refused, or gone
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._idle = False

    # -- asyncio.Protocol, forwarded ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if not self._guard.admit():
            self._transport.write(_BUSY)
            self._transport.close()
            return
        self._handler = self._make_handler()
        self._await_head()
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            return
        if self._idle:  # the first byte of the next request
            self._idle = False
            self._await_head()
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._handler is None else self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        handler, self._handler = self._handler, None
        if handler is not None:
            self._guard.left()
            handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    # -- told by the middleware ---------------------------------------------------------------------------

    def request_started(self) -> None:
        """A request head is complete: its handler runs."""
        self._stop_deadline()
        self._idle = False

    def response_done(self) -> None:
        """The handler returned; the connection idles until the next request's first byte."""
        self._idle = True

    # -- the head deadline ------------------------------------------------------------------------------

    def _await_head(self) -> None:
        self._stop_deadline()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.header_timeout_s, self._head_timed_out)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self._transport is None or self._transport.is_closing():
            return
        self._guard.metrics.connections_closed.labels(reason="header_timeout").inc()
        log.debug("closing a connection without a complete request head", peer=self._peer())
        self._transport.close()

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return "" if not peer else f"{peer[0]}:{peer[1]}"


class GuardedSite(web.BaseSite):
    """aiohttp's TCP site, with every connection behind `guard`."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *, backlog: int = 128
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        sockets = self._server.sockets if self._server is not None else ()  # type: ignore[attr-defined]
        port = sockets[0].getsockname()[1] if sockets else self._port
        return f"http://{self._host}:{port}"

    async def start(self) -> None:
        await super().start()  # registers the site with the runner
        server = self._runner.server
        assert server is not None, "the runner must be set up first"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.factory(server), self._host, self._port, backlog=self._backlog
        )


def _connection(request: web.Request) -> GuardedConnection | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GuardedConnection) else None


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the request's connection (when it is guarded) that its head is complete and, when the
    handler returns, that it is idle: that is what starts and stops the head deadline."""
    connection = _connection(request)
    if connection is not None:
        connection.request_started()
    try:
        return await handler(request)
    finally:
        if connection is not None:
            connection.response_done()
