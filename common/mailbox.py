"""A process's ZeroMQ inbox and outboxes, on an asyncio event loop.

Every process of the stack (gateway and stage services) binds one ROUTER, its inbox, and advertises
its endpoint. To talk to a peer it connects a DEALER to the peer's inbox (one per peer, cached). All
messages are one-way; an answer is a message to the asker's inbox. This keeps every process's I/O in
one place, makes no process wait on another's reply socket, and lets any process reach any other by
address alone (which is what `--scale decode=2` needs: nothing is wired by hand).

With the stack's keys (common/stack_keys.py) the inbox is a CURVE server whose ZAP handler admits
only members, and every outbox a CURVE client: a process without the keys is never connected, so
nothing it sends arrives and nothing is sent to it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from common.protocol import Msg
from common.stack_keys import StackKeys, guard
from common.wire import ProtocolError, decode_frames, encode_frames

log = logging.getLogger("epd.mailbox")


class Mailbox:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        name: str,
        bind: str = "tcp://127.0.0.1:*",
        advertise_host: str = "",
        keys: StackKeys | None = None,
    ) -> None:
        self.ctx = ctx
        self.name = name
        self.keys = keys
        self._auth = guard(ctx, keys)
        self.inbox = ctx.socket(zmq.ROUTER)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, 0)
        if keys is not None:
            keys.serve(self.inbox)
        self.inbox.bind(bind)
        self.address: str = self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
        if advertise_host:  # bound to 0.0.0.0 (a container): peers reach us by name
            self.address = f"tcp://{advertise_host}:{self.address.rsplit(':', 1)[1]}"
        self._outboxes: dict[str, zmq.asyncio.Socket] = {}
        self.dropped = 0  # malformed messages received and dropped

    async def recv(self) -> tuple[Msg, list[Any]]:
        """The next well-formed message; malformed ones are logged and dropped."""
        _, msg, buffers = await self.recv_from()
        return msg, buffers

    async def recv_from(self) -> tuple[bytes, Msg, list[Any]]:
        """The next well-formed message with the routing id of the connection it came on (the same
        for every message of one peer's outbox, until that connection is made again)."""
        while True:
            frames = await self.inbox.recv_multipart(copy=False)
            try:
                msg, buffers = decode_frames(frames[1:])
                return bytes(frames[0].bytes), msg, buffers
            except ProtocolError as exc:
                self.dropped += 1
                log.warning("dropped a malformed message on %s: %s", self.name, exc)

    def send(self, address: str, msg: Msg, buffers: Sequence[Any] = ()) -> None:
        """Queue `msg` for the process whose inbox is `address` (never blocks)."""
        if not msg.sender:
            msg.sender = self.name
        self.outbox(address).send_multipart(encode_frames(msg, buffers), copy=False)

    def reply(self, route: bytes, msg: Msg) -> None:
        """Answer over the connection a message came on (`recv_from`'s route), opening no socket: how
        a server answers processes it does not know. The peer reads it from its outbox (`outbox`)."""
        if not msg.sender:
            msg.sender = self.name
        self.inbox.send_multipart([route, *encode_frames(msg, ())], copy=False)

    def outbox(self, address: str) -> zmq.asyncio.Socket:
        """The DEALER connected to `address` (made on first use): answers sent with `reply` land here."""
        sock = self._outboxes.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            if self.keys is not None:
                self.keys.connect(sock)
            sock.connect(address)
            self._outboxes[address] = sock
        return sock

    async def recv_reply(self, address: str) -> tuple[Msg, list[Any]]:
        """The next well-formed answer `address` sent back over our outbox to it."""
        sock = self.outbox(address)
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                return decode_frames(frames)
            except ProtocolError as exc:
                self.dropped += 1
                log.warning("dropped a malformed reply on %s: %s", self.name, exc)

    def forget(self, address: str) -> None:
        """Close the outbox to a peer that is gone."""
        sock = self._outboxes.pop(address, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for sock in self._outboxes.values():
            sock.close(linger=0)
        self._outboxes.clear()
        self.inbox.close(linger=0)
        if self._auth is not None:
            self._auth.release()
            self._auth = None
