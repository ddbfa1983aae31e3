"""Who belongs to the stack: REGISTERs admitted or refused, heartbeats, LEAVING, and instances that die.

Kept apart from the request path (gateway/cluster.py) because its rules are about processes, not
requests: a REGISTER is answered over its own connection unless admitted (no socket is opened for a
process that is not let in); a heartbeat from an unknown id is told to register again (the gateway
restarted, or dropped it); an instance late with its heartbeats gets no new work, one whose heartbeats
stopped is dropped; and whatever a dead, restarted or departed instance held fails at once with a
503 naming it, and is aborted at every other instance still working on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from common.mailbox import Mailbox
from common.protocol import Heartbeat, RegisterAck
from gateway.backend import BackendError
from gateway.flights import Flight, Flights
from gateway.registry import Instance, Registry
from gateway.role_changes import RoleChanges

log = logging.getLogger("epd.gateway.membership")

SendAbort = Callable[[str, Flight, str], None]  # (request id, flight, instance not to send to)


class Membership:
    def __init__(
        self,
        registry: Registry,
        flights: Flights,
        role_changes: RoleChanges,
        mailbox: Callable[[], Mailbox],
        send_abort: SendAbort,
        heartbeat_interval: float,
    ) -> None:
        self.registry = registry
        self.flights = flights
        self.role_changes = role_changes
        self._mailbox = mailbox
        self._send_abort = send_abort
        self.heartbeat_interval = heartbeat_interval

    def heartbeat(self, msg: Heartbeat, route: bytes) -> None:
        if not self.registry.heartbeat(msg.sender, msg.load, route):
            # unknown (the gateway restarted, or dropped it after missed heartbeats): rejoin. The
            # answer goes back over the heartbeat's own connection: no socket for an unknown id
            again = RegisterAck(accepted=False, retry=True, reason="unknown instance, register again")
            self._mailbox().reply(route, again)

    def register(self, info, route: bytes) -> None:
        """Admit an instance; refusals are answered over the REGISTER's own connection, the ack of an
        admitted one at its inbox."""
        mailbox = self._mailbox()
        if self.registry.held_elsewhere(info.instance_id, route):
            busy = f"instance id {info.instance_id!r} is held by a live instance; retry once it stops"
            mailbox.reply(route, RegisterAck(accepted=False, retry=True, reason=busy))
            log.warning("refused a REGISTER for live instance %s from another connection", info.instance_id)
            return
        reason, replaced = self.registry.admit(info, route)
        if replaced is not None:
            self.fail(replaced, "was restarted")
        ack = RegisterAck(
            accepted=reason is None, reason=reason or "", heartbeat_interval=self.heartbeat_interval
        )
        if reason is None:
            mailbox.send(info.address, ack)
        else:
            mailbox.reply(route, ack)
        log.info("instance %s (%s) %s", info.instance_id, info.roles, reason or "registered")

    def leaving(self, instance_id: str, route: bytes) -> None:
        """A drained instance says goodbye: forget it; anything it still held fails."""
        inst = self.registry.instances.get(instance_id)
        if inst is None or (inst.route and route and inst.route != route):
            return  # not from the connection that registered it
        self._mailbox().forget(inst.address)
        for rid in self.role_changes.on_leaving(inst):
            flight = self.flights.get(rid)
            if flight is not None:
                self._send_abort(rid, flight, inst.id)
                flight.queue.put_nowait(BackendError(503, f"instance {inst.id} left holding this request"))

    async def watch(self) -> None:
        """Mark instances whose heartbeats are late suspect, drop those whose heartbeats stopped, and fail
        what they held."""
        while True:
            await asyncio.sleep(self.heartbeat_interval / 2)
            for inst in self.registry.newly_suspect():
                log.warning("instance %s (%s) is late with its heartbeats; no new work for it", inst.id,
                            inst.info.roles)  # fmt: skip
            for inst in self.registry.expired():
                log.warning("instance %s (%s) stopped heartbeating; dropped", inst.id, inst.info.roles)
                self._mailbox().forget(inst.address)
                self.fail(inst, "died")

    def fail(self, inst: Instance, what: str) -> None:
        """End every request `inst` held with an error, and free them on the other stages."""
        for rid in list(inst.inflight):
            flight = self.flights.get(rid)
            if flight is None:
                continue
            stage = flight.holders.pop(inst.id, "?")
            self._send_abort(rid, flight, inst.id)  # e.g. the prefill still computing for a dead decode
            message = f"the {stage_name(stage)} instance {inst.id} serving this request {what}"
            flight.queue.put_nowait(BackendError(503, message))
        inst.inflight.clear()


def stage_name(stage: str) -> str:
    names = {"E": "encode", "P": "prefill", "D": "decode"}
    return "/".join(names.get(s, s) for s in stage) or "stage"
