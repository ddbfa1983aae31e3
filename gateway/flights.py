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

from gateway.instance_metrics import StageClock
from gateway.registry import Instance, Registry


@dataclass(slots=True)
class Flight:
    queue: asyncio.Queue
    holders: dict[str, str] = field(default_factory=dict)  # instance id -> stage letter(s)
    decode_id: str = ""
    prefill_id: str = ""  # kept once prefill leaves `holders`: it may still be shipping the KV
    aborted: bool = False
    early: list = field(default_factory=list)  # decode's tokens that overtook the first token
    handed_from: str = ""  # a decode instance handing the request off, until the target's tokens come
    clock: StageClock = field(default_factory=StageClock)


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
