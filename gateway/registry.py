"""The gateway's view of the stage instances: who is alive, what each hosts, how loaded it is.

Instances register themselves (REGISTER) and then send heartbeats; one that misses heartbeats for
`timeout_s` is dropped, and the requests it held are failed by the cluster. Before that, from
`suspect_after_s` without a heartbeat, it is *suspect*: it keeps what it holds (a process that merely
stalled, or a congested link, carries on when it wakes) but gets no new work while an instance of its
role is not suspect, so a stall costs the requests already there and no others, and a dead process is
still failed at `timeout_s`. Nothing is configured by hand: scaling a stage up is starting another
process that registers.

An instance id belongs to the connection that registered it (its ZeroMQ routing id at the gateway's
inbox) for as long as it heartbeats: a REGISTER or heartbeat for that id from another connection is
refused, so no process can take over, refresh or silence an instance that is alive. A process that
restarts under its old id registers once the old registration has expired (within `timeout_s`).

A heartbeat's phase and cache figures are checked before they are kept (gateway/stage_figures.py):
refused ones leave the instance's previous figures in place and are counted in `figures_refused`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from common.protocol import PROTOCOL_VERSION, InstanceInfo, Load
from gateway.stage_figures import figures_problem, keep_figures

log = logging.getLogger("epd.gateway.registry")


@dataclass(slots=True)
class Instance:
    info: InstanceInfo
    last_seen: float
    load: Load = field(default_factory=Load)
    inflight: set[str] = field(default_factory=set)  # request ids this instance holds
    route: bytes = b""  # the connection that registered it (b"": not bound, in-process tests)
    suspect: bool = False  # heartbeats late, not yet dead: no new work (see the module's docstring)
    pending_roles: str | None = None  # asked to change its roles ("": to leave): no new work at all

    @property
    def id(self) -> str:
        return self.info.instance_id

    @property
    def address(self) -> str:
        return self.info.address

    def has(self, role: str) -> bool:
        return role in self.info.roles


class Registry:
    def __init__(
        self,
        model_name: str,
        timeout_s: float = 3.0,
        affinity_size: int = 100_000,
        suspect_after_s: float | None = None,
    ) -> None:
        """`suspect_after_s`: default half of `timeout_s` (three heartbeats at the default interval)."""
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.suspect_after_s = timeout_s / 2 if suspect_after_s is None else min(suspect_after_s, timeout_s)
        self.instances: dict[str, Instance] = {}
        self._encoded_at: OrderedDict[str, str] = OrderedDict()  # content hash -> encode instance id
        self._affinity_size = affinity_size
        self.figures_refused = 0  # heartbeats whose phase or cache figures failed their checks

    def held_elsewhere(self, instance_id: str, route: bytes) -> bool:
        """Whether a live instance of that id registered over another connection."""
        inst = self.instances.get(instance_id)
        return (
            inst is not None
            and inst.route != route
            and bool(inst.route)
            and time.monotonic() - inst.last_seen <= self.timeout_s
        )

    def admit(self, info: InstanceInfo, route: bytes = b"") -> tuple[str | None, Instance | None]:
        """Add (or refresh) an instance. Returns why it is refused (or None) and the instance it
        replaces: a new process under a known id (a restart faster than the heartbeat timeout) means
        the old process is gone, and so is everything it held."""
        if info.protocol_version != PROTOCOL_VERSION:
            return f"protocol version {info.protocol_version}, the gateway speaks {PROTOCOL_VERSION}", None
        if info.model != self.model_name:
            return f"serves model {info.model!r}, the gateway serves {self.model_name!r}", None
        old = self.instances.get(info.instance_id)
        inst = Instance(info, time.monotonic(), route=route)
        replaced = None
        if old is not None:
            if (old.info.address, old.info.pid) == (info.address, info.pid):
                inst.inflight = old.inflight  # the same process registering again
            else:
                replaced = old
        self.instances[info.instance_id] = inst
        return None, replaced

    def heartbeat(self, instance_id: str, load: Load, route: bytes = b"") -> bool:
        """Refresh a live instance; False when the id is unknown or bound to another connection."""
        inst = self.instances.get(instance_id)
        if inst is None or (inst.route and route and inst.route != route):
            return False
        inst.last_seen = time.monotonic()
        if (problem := figures_problem(load)) is not None:
            self.figures_refused += 1
            log.warning(
                "refused the figures of a heartbeat from %r: %s (%d refused)",
                instance_id, problem, self.figures_refused,
            )  # fmt: skip
            keep_figures(load, inst.load)
        inst.load = load
        inst.suspect = False
        return True

    def expired(self) -> list[Instance]:
        """Remove and return the instances whose heartbeats stopped."""
        now = time.monotonic()
        dead = [i for i in self.instances.values() if now - i.last_seen > self.timeout_s]
        for inst in dead:
            del self.instances[inst.id]
        return dead

    def newly_suspect(self) -> list[Instance]:
        """Mark and return the live instances whose heartbeats have just become late."""
        now = time.monotonic()
        late = [
            i for i in self.instances.values() if not i.suspect and now - i.last_seen > self.suspect_after_s
        ]
        for inst in late:
            inst.suspect = True
        return late

    def remove(self, instance_id: str) -> Instance | None:
        return self.instances.pop(instance_id, None)

    def with_role(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.has(role)]

    def candidates(self, role: str) -> list[Instance]:
        """The instances that may get new work for `role`: those not suspect, or, when every one is
        suspect, all of them; never one whose roles are changing (gateway/role_changes.py)."""
        every = [i for i in self.with_role(role) if i.pending_roles is None]
        return [i for i in every if not i.suspect] or every

    @staticmethod
    def load_order(inst: Instance) -> tuple:
        """By requests the gateway has placed there, then by the queue the instance reported."""
        return len(inst.inflight), inst.load.waiting + inst.load.encode_queue, inst.id

    def least_loaded(self, role: str) -> Instance | None:
        """The least loaded of `candidates(role)` (see `load_order`)."""
        candidates = self.candidates(role)
        return min(candidates, key=self.load_order) if candidates else None

    def encoder_for(self, hashes: list[str]) -> Instance | None:
        """Cache affinity first (an instance that encoded one of these items), then load."""
        for h in hashes:
            owner = self.instances.get(self._encoded_at.get(h, ""))
            if owner is not None and owner.has("E") and not owner.suspect and owner.pending_roles is None:
                return owner
        return self.least_loaded("E")

    def remember_encoded(self, hashes: list[str], instance_id: str) -> None:
        for h in hashes:
            self._encoded_at[h] = instance_id
            self._encoded_at.move_to_end(h)
        while len(self._encoded_at) > self._affinity_size:
            self._encoded_at.popitem(last=False)

    def max_model_len(self) -> int | None:
        """The shortest context a live prefill or decode instance reported (each caps it at what its KV
        pool holds), so that any placement can hold a request; None before any has reported one."""
        lens = [
            i.info.max_model_len
            for i in self.instances.values()
            if i.info.max_model_len and set(i.info.roles) & {"P", "D"}
        ]
        return min(lens, default=None)

    def counts(self) -> dict[str, int]:
        return {role: len(self.with_role(role)) for role in "EPD"}
