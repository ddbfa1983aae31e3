"""Role changes and drains the gateway asks of its instances, and the decode hand-offs they need.

`set_roles(instance, roles)` marks the instance pending (gateway/registry.py: it gets no new work
from that moment) and sends it SET_ROLES; `roles == ""` is a drain. The instance finishes what it
holds and registers again with its new roles (which clears the mark: a new registry entry), or, for
a drain, sends LEAVING and exits.

A decode-only instance that is changing hands each request it decodes to the least loaded other
decode-only instance: at once for those past their first token, at their first token for the others
(their KV is still on the way to it). HANDOFF goes to the source, which moves the KV and the tokens
so far to the target (services/decode/handoff.py). The flight's decode instance is the target from
then on, and the source stays a holder until the target's first tokens come, so that an abort
reaches both and the source's death still fails the request at once. With no other decode-only
instance, requests stay and finish where they are (co-located PD instances decode inside their
prefill engine and take no hand-offs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from common.protocol import Handoff, Msg, SetRoles
from common.role_sets import canonical_roles, roles_problem
from gateway.flights import Flight, Flights
from gateway.registry import Instance, Registry

log = logging.getLogger("epd.gateway.roles")


class RoleChangeError(Exception):
    """A role change the gateway refuses: `status` is the HTTP status an admin call answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decodes_alone(inst: Instance) -> bool:
    """A decode-only process: its decode worker takes KV_RESERVE, so it can take or give a hand-off."""
    return inst.info.roles == "D"


class RoleChanges:
    def __init__(self, registry: Registry, flights: Flights, send: Callable[[str, Msg], None]) -> None:
        self.registry = registry
        self.flights = flights
        self.send = send  # (address, message)
        self.handoffs = 0  # HANDOFFs sent since start
        self.changes = 0  # SET_ROLES sent since start

    def set_roles(self, instance_id: str, roles: str, reason: str = "") -> str:
        """Ask `instance_id` to serve `roles` ("" : drain); returns the canonical roles. Raises
        `RoleChangeError` for an unknown instance, bad roles, or a change already under way."""
        inst = self.registry.instances.get(instance_id)
        if inst is None:
            raise RoleChangeError(404, f"no instance {instance_id[:128]!r} is registered")
        if problem := roles_problem(roles):
            raise RoleChangeError(400, problem)
        if inst.pending_roles is not None:
            raise RoleChangeError(
                409, f"instance {instance_id} is already changing to {inst.pending_roles!r}"
            )
        wanted = canonical_roles(roles)
        if wanted == inst.info.roles:
            raise RoleChangeError(409, f"instance {instance_id} serves {wanted} already")
        inst.pending_roles = wanted
        self.changes += 1
        self.send(inst.address, SetRoles(roles=wanted, reason=reason[:200]))
        log.info(
            "instance %s (%s) asked to serve %r: %s", inst.id, inst.info.roles, wanted or "nothing", reason
        )
        if decodes_alone(inst):
            for rid in list(inst.inflight):
                flight = self.flights.get(rid)
                if flight is not None and flight.decode_id == inst.id and flight.clock.first_token_at:
                    self._hand_off(inst, rid, flight)
        return wanted

    def after_first_token(self, rid: str, flight: Flight) -> None:
        """A first token came: its decode instance may be changing roles since the request was placed."""
        inst = self.registry.instances.get(flight.decode_id)
        if inst is not None and inst.pending_roles is not None and decodes_alone(inst):
            self._hand_off(inst, rid, flight)

    def on_tokens(self, rid: str, flight: Flight, sender: str) -> None:
        """Tokens from the target of a hand-off: the source is done with the request."""
        if flight.handed_from and sender == flight.decode_id:
            source = self.registry.instances.get(flight.handed_from)
            if source is not None:
                source.inflight.discard(rid)
            flight.holders.pop(flight.handed_from, None)
            flight.handed_from = ""

    def on_leaving(self, inst: Instance) -> list[str]:
        """The instance drained and exits: forget it. Returns the requests it still held that were
        not handed off (the cluster fails them; a stage that follows the protocol leaves none)."""
        self.registry.remove(inst.id)
        left = []
        for rid in list(inst.inflight):
            flight = self.flights.get(rid)
            if flight is not None and flight.handed_from == inst.id:
                flight.holders.pop(inst.id, None)
                flight.handed_from = ""
            elif flight is not None:
                left.append(rid)
        inst.inflight.clear()
        log.info("instance %s (%s) drained and left", inst.id, inst.info.roles)
        return left

    def _hand_off(self, source: Instance, rid: str, flight: Flight) -> None:
        if flight.handed_from:
            return  # one move at a time
        targets = [i for i in self.registry.candidates("D") if decodes_alone(i) and i.id != source.id]
        if not targets:
            return  # nowhere to go: it finishes here
        target = min(targets, key=self.registry.load_order)
        self.send(source.address, Handoff(request_id=rid, decode_id=target.id, decode_address=target.address))
        self.flights.hold(flight, target, "D", rid)
        flight.decode_id = target.id
        flight.handed_from = source.id
        self.handoffs += 1
