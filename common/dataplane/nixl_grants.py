"""Who may write where: the nixl consumer's grants, and the messages that ask for them.

NIXL writes are one-sided: the producer names consumer addresses and the bytes land without the
consumer's process taking part. So before moving any byte of a write the producer asks the consumer
(ZeroMQ DEALER -> ROUTER, `Ask`), and the consumer answers from its current state (`Reply`):

- refused when the transfer is finished or aborted here (so an aborted transfer's late bytes never
  land), or when a region lies outside its buffer (the consumer's handle fails with that reason);
- granted with the addresses of the buffers named, and the consumer agent's NIXL metadata when the
  producer's copy is older. A descriptor published at start-up therefore reaches buffers allocated
  later, and a buffer freed and allocated again under the same id is never written at its old address.

Before each further batch of a long write the producer asks again (`Ask.grant` set, sent while the
previous batch moves), so a consumer's abort stops it within a batch. The producer reports the regions
it wrote (`Done`, on the plane's PUSH channel) and closes the grant with a final one.

A buffer freed while a grant names it stays registered, and its memory alive, until that grant closes
or expires: UCX would otherwise write into memory the process may have reused (it does not check that a
registration still exists). `GrantBook` keeps this state; it calls neither NIXL nor ZeroMQ.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

Span = tuple[str, int, int]  # (buffer id, offset, length) in the consumer's buffers


class Ask(msgspec.Struct, array_like=True):
    """Producer -> consumer: may these spans of the transfer be written (or, with `grant`, still)?"""

    seq: int
    transfer_id: str
    spans: list[Span] = []
    grant: int = 0  # nonzero: renew this grant before the next batch
    md_version: int = -1  # the version of the consumer's metadata the producer has loaded


class Reply(msgspec.Struct, array_like=True):
    seq: int
    grant: int = 0  # 0: refused, `reason` says why
    reason: str = ""
    md_version: int = 0
    metadata: bytes = b""  # the consumer agent's NIXL metadata, when the producer's is older
    buffers: dict[str, tuple[int, int]] = {}  # buffer id -> (address, size)


class Done(msgspec.Struct, array_like=True):
    """Producer -> consumer, after NIXL reported the batch DONE (the endpoint is flushed by then)."""

    grant: int
    final: bool
    spans: list[Span] = []


ask_encoder = msgspec.msgpack.Encoder()
ask_decoder = msgspec.msgpack.Decoder(Ask)
reply_decoder = msgspec.msgpack.Decoder(Reply)
done_decoder = msgspec.msgpack.Decoder(Done)


class Refused(Exception):
    """The consumer will not take these bytes; `fatal`: the transfer fails on the consumer too."""

    def __init__(self, reason: str, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.fatal = fatal


@dataclass(eq=False)
class Destination:
    """A consumer buffer registered with the agent; `registration` is what deregistering takes."""

    view: memoryview
    address: int
    registration: Any
    serial: int = 0


@dataclass
class _Grant:
    transfer_id: str
    destinations: dict[str, Destination]
    began: float
    expires: float


class GrantBook:
    """The consumer's destinations and open grants; thread-safe (desk thread, receiver, compute thread).

    Methods that end a registration return the registrations to deregister; the caller does it.
    """

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self.version = 0  # bumped whenever the set of live destinations changes
        self._lock = threading.Lock()
        self._live: dict[str, Destination] = {}
        self._grants: dict[int, _Grant] = {}
        self._retired: list[Destination] = []
        self._ids = itertools.count(1)

    def add(self, buffer_id: str, destination: Destination) -> None:
        with self._lock:
            if buffer_id in self._live:
                raise ValueError(f"buffer {buffer_id!r} is already registered; free() it first")
            destination.serial = next(self._ids)
            self._live[buffer_id] = destination
            self.version += 1

    def remove(self, buffer_id: str) -> list[Any]:
        """Forget a buffer; its registration ends now unless an open grant still names it."""
        with self._lock:
            dest = self._live.pop(buffer_id, None)
            if dest is None:
                return []
            self.version += 1
            if any(dest in g.destinations.values() for g in self._grants.values()):
                self._retired.append(dest)
                return []
            return [dest.registration]

    def snapshot(self) -> tuple[int, list[tuple[int, int]]]:
        """(version, [(address, size)]) of the live destinations, for the agent's metadata."""
        with self._lock:
            return self.version, [(d.address, d.view.nbytes) for d in self._live.values()]

    def grant(
        self, transfer_id: str, spans: list[Span], admits: Callable[[str], bool], now: float
    ) -> tuple[int, dict[str, tuple[int, int]]]:
        """Open a grant for writing `spans` of a transfer; raises Refused."""
        with self._lock:
            if not admits(transfer_id):
                raise Refused("the consumer has finished or aborted this transfer")
            named: dict[str, Destination] = {}
            for buffer_id, offset, length in spans:
                dest = self._live.get(buffer_id)
                if dest is None:
                    raise Refused(f"unknown buffer {buffer_id!r}", fatal=True)
                if offset < 0 or length < 0 or offset + length > dest.view.nbytes:
                    raise Refused(
                        f"region [{offset}, {offset + length}) lies outside buffer {buffer_id!r} "
                        f"of {dest.view.nbytes} bytes",
                        fatal=True,
                    )
                named[buffer_id] = dest
            grant_id = next(self._ids)
            self._grants[grant_id] = _Grant(transfer_id, named, now, now + self.ttl)
            return grant_id, {b: (d.address, d.view.nbytes) for b, d in named.items()}

    def renew(self, grant_id: int, transfer_id: str, admits: Callable[[str], bool], now: float) -> None:
        """Let a grant go on to its next batch; raises Refused once the transfer is over here."""
        with self._lock:
            grant = self._grants.get(grant_id)
            if grant is None or grant.transfer_id != transfer_id:
                raise Refused("the grant expired or was never given")
            if not admits(transfer_id):
                raise Refused("the consumer has finished or aborted this transfer")
            grant.expires = now + self.ttl

    def landed(self, grant_id: int, transfer_id: str, buffer_id: str) -> tuple[float, str | None]:
        """(when the grant began, why bytes it reports for `buffer_id` cannot be taken, or None)."""
        with self._lock:
            grant = self._grants.get(grant_id)
            if grant is None or grant.transfer_id != transfer_id:
                return 0.0, "the report names no open grant of this transfer"
            dest = grant.destinations.get(buffer_id)
            if dest is None:
                return grant.began, f"buffer {buffer_id!r} was not part of the grant"
            if self._live.get(buffer_id) is not dest:
                return grant.began, f"buffer {buffer_id!r} was freed while the transfer was writing it"
            return grant.began, None

    def close(self, grant_id: int) -> list[Any]:
        with self._lock:
            self._grants.pop(grant_id, None)
            return self._release_retired()

    def expire(self, now: float) -> list[Any]:
        """Drop grants whose producer went silent for `ttl` seconds."""
        with self._lock:
            for grant_id in [g for g, grant in self._grants.items() if grant.expires < now]:
                del self._grants[grant_id]
            return self._release_retired()

    def clear(self) -> list[Any]:
        """Everything still registered (at close)."""
        with self._lock:
            dests = [*self._live.values(), *self._retired]
            self._live, self._grants, self._retired = {}, {}, []
            return [d.registration for d in dests]

    def __len__(self) -> int:
        return len(self._grants)

    def _release_retired(self) -> list[Any]:
        named = {id(d) for g in self._grants.values() for d in g.destinations.values()}
        freed = [d for d in self._retired if id(d) not in named]
        self._retired = [d for d in self._retired if id(d) in named]
        return [d.registration for d in freed]
