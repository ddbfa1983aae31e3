"""The I/O thread of a stage process: its mailbox, registration and heartbeats, off the compute loop.

The compute loop (a forward pass can take a second on a big model) never touches a socket: incoming
messages land in a thread-safe queue it drains between steps, and `send()` hands outgoing messages to
this thread's event loop. Heartbeats go out on this thread's own timer, so a long forward pass never
makes the gateway think the process died. Answers the gateway sends back over this process's own
connection to it (how it answers a process it does not know yet) are read here too. Each message
reaches the compute loop with the connection it came on (`Inbound.peer`), which its sender cannot
forge: the decode role caps reservations per peer, and only the gateway's own answers may make this
process drop its work and register again.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import zmq.asyncio

from common.mailbox import Mailbox
from common.protocol import Heartbeat, Load, Msg
from common.stack_keys import StackKeys

_WAKE: Any = object()
# Heartbeat intervals this process accepts from a RegisterAck: a forged or mistaken 0 (never) or an
# hour (dropped as dead) would take the instance out of the stack.
HEARTBEAT_BOUNDS_S = (0.05, 5.0)


class Inbound(NamedTuple):
    """A message for the compute loop, with the connection it came on: `peer` is its routing id at
    this process's inbox (one per connected process, unforgeable by the sender's fields), or b"" for
    an answer the gateway sent back over this process's own connection to it."""

    msg: Msg
    frames: list[Any]
    peer: bytes

    @property
    def from_gateway_reply(self) -> bool:
        return not self.peer


def bounded_interval(seconds: float) -> float:
    low, high = HEARTBEAT_BOUNDS_S
    return min(max(float(seconds), low), high) if seconds == seconds else high  # NaN: the slowest


class ServiceIO:
    def __init__(
        self,
        name: str,
        gateway_address: str,
        bind: str = "tcp://127.0.0.1:*",
        advertise_host: str = "",
        keys: StackKeys | None = None,
    ) -> None:
        self.name = name
        self.keys = keys
        self.gateway_address = gateway_address
        self._bind = bind
        self._advertise_host = advertise_host
        self.inbox: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self.address = ""
        self.load: Callable[[], Load] = Load
        self.heartbeat_interval = 0.0  # 0: not registered yet, no heartbeats
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mailbox: Mailbox | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-io", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the I/O thread did not start")

    def send(self, address: str, msg: Msg, buffers: Sequence[Any] = ()) -> None:
        """Thread-safe: queue a message for `address`. Buffers must stay alive and unchanged until
        sent; pass bytes or memory nobody writes to in the meantime."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._send_now, address, msg, buffers)

    def to_gateway(self, msg: Msg, buffers: Sequence[Any] = ()) -> None:
        self.send(self.gateway_address, msg, buffers)

    def wake(self, *_: Any) -> None:
        """Thread-safe: end the compute loop's wait at once (a transfer finished, say)."""
        self.inbox.put(_WAKE)

    def get(self, timeout: float) -> list[Inbound]:
        """Every message waiting, blocking up to `timeout` seconds for the first (or a wake)."""
        out = []
        try:
            out.append(self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait())
            while True:
                out.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return [item for item in out if item is not _WAKE]

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=5)

    # ---- the thread -------------------------------------------------------------------------------

    def _send_now(self, address: str, msg: Msg, buffers: Sequence[Any]) -> None:
        assert self._mailbox is not None
        self._mailbox.send(address, msg, buffers)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        ctx = zmq.asyncio.Context()
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._mailbox = Mailbox(ctx, self.name, self._bind, self._advertise_host, keys=self.keys)
        self.address = self._mailbox.address
        self._ready.set()
        tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._replies()),
            asyncio.create_task(self._heartbeat()),
        ]
        await self._stopped.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._mailbox.close()
        ctx.term()

    async def _receive(self) -> None:
        assert self._mailbox is not None
        while True:
            route, msg, frames = await self._mailbox.recv_from()
            self.inbox.put(Inbound(msg, frames, route))

    async def _replies(self) -> None:
        assert self._mailbox is not None
        while True:
            msg, frames = await self._mailbox.recv_reply(self.gateway_address)
            self.inbox.put(Inbound(msg, frames, b""))

    async def _heartbeat(self) -> None:
        while True:
            interval = self.heartbeat_interval
            if interval > 0:
                self._send_now(self.gateway_address, Heartbeat(load=self.load(), address=self.address), ())
            await asyncio.sleep(interval or 0.05)
