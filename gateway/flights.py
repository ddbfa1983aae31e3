"""The gateway's table of requests in flight: which instances hold each one, and who must hear its abort.

A request is held by every instance it was placed on (its stage letters per instance), counted in
that instance's `inflight` set (the load the router balances on), and leaves each one as its stages
finish: encode and prefill once the first token is back, decode when the request ends. The prefill
instance is remembered after it leaves, because it may still be shipping the KV: an abort must reach
it too. Nothing here sends a message; the cluster does, to the addresses `abort_targets` names.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.backend import TokenEvent
from gateway.instance_metrics import StageClock
from gateway.registry import Instance, Registry

MAX_AHEAD = 256  # events of one request waiting for an earlier one, at most


@dataclass(slots=True)
class Flight:
    queue: asyncio.Queue
    holders: dict[str, str] = field(default_factory=dict)  # instance id -> stage letter(s)
    decode_id: str = ""
    prefill_id: str = ""  # kept once prefill leaves `holders`: it may still be shipping the KV
    aborted: bool = False
    next_position: int = 0  # output tokens put on the queue so far
    closed: bool = False  # the finished event is on the queue, or the request failed: nothing follows
    ahead: dict[int, TokenEvent] = field(default_factory=dict)  # came before their turn, by position
    handed_from: str = ""  # a decode instance handing the request off, until the target's tokens come
    clock: StageClock = field(default_factory=StageClock)

    def deliver(self, position: int, event: TokenEvent) -> bool:
        """Queue `event` (tokens from the request's output index `position`) in output order.

        Tokens reach the gateway on more than one connection: the first token from prefill and the
        rest from decode; in a hand-off, the last ones from the source and the next from the target.
        Each connection keeps its own order, but one may overtake another, so an event that comes
        early waits here for the ones before it; one already delivered (a repeat), and anything after
        the event that ended the stream, is dropped.
        False, once, when too many wait: a stage sends positions that never close up (the caller
        fails the request; what comes for it later is dropped)."""
        if position < self.next_position or self.closed:
            return True
        if position > self.next_position:
            self.ahead[position] = event
            if len(self.ahead) <= MAX_AHEAD:
                return True
            self.closed = True
            self.ahead.clear()
            return False
        while True:
            self.queue.put_nowait(event)
            self.next_position += len(event.token_ids)
            if event.finished:
                self.closed = True
                self.ahead.clear()
                return True
            event = self.ahead.pop(self.next_position, None)
            if event is None:
                return True


class Flights:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._table: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._table)

    def get(self, request_id: str) -> Flight | None:
        return self._table.get(request_id)

    def add(self, request_id: str, flight: Flight) -> Flight:
        self._table[request_id] = flight
        return flight

    def hold(self, flight: Flight, inst: Instance, stage: str, request_id: str) -> None:
        """`inst` holds the request for `stage` (one letter; an instance may hold several)."""
        flight.holders[inst.id] = flight.holders.get(inst.id, "") + stage
        inst.inflight.add(request_id)

    def release(self, request_id: str, flight: Flight, keep: str) -> None:
        """The request left every instance but `keep` (an instance id; "" keeps none)."""
        for iid in [i for i in flight.holders if i != keep]:
            inst = self.registry.instances.get(iid)
            if inst is not None:
                inst.inflight.discard(request_id)
            del flight.holders[iid]

    def land(self, request_id: str) -> None:
        """The request is over: out of the table and out of every instance's load."""
        flight = self._table.pop(request_id, None)
        if flight is not None:
            self.release(request_id, flight, keep="")

    def abort_targets(self, flight: Flight, dead: str = "") -> list[str]:
        """Mark the flight aborted; the addresses of every live instance that holds it or may still
        work on it, never `dead` (an instance declared dead: a process restarted under its id holds
        nothing of it)."""
        flight.aborted = True
        live = (self.registry.instances.get(i) for i in {*flight.holders, flight.prefill_id} - {dead, ""})
        return [inst.address for inst in live if inst is not None]
