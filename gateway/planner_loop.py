"""The planner in the gateway's event loop: a tick every `interval_s`, and in mode on, the actuator.

The loop is the only part that reads the clock and the registry and that changes anything: the
`Planner` decides from what it is given, so it stays testable with synthetic views and time steps.
The actuator is the gateway's `set_roles(instance_id, roles, reason)`, which only sends a message
(the instance changes roles on its own time and re-registers), so calling it from the event loop
never blocks. A tick that fails is logged and the loop goes on: the planner is advice on top of a
working cluster, and must never take the gateway down.

    loop = PlannerLoop(planner, lambda: list(registry.instances.values()), slo, cluster.set_roles)
    task = asyncio.create_task(loop.run())   # ... task.cancel() on shutdown
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.planner import Decision, Planner
from gateway.planner_signals import InstanceView, view_of
from gateway.planner_slo import SloWindow

log = logging.getLogger("epd.gateway.planner")

Actuator = Callable[[str, str, str], None]  # set_roles(instance_id, roles, reason)


class PlannerLoop:
    def __init__(
        self,
        planner: Planner,
        instances_fn: Callable[[], Iterable[Any]],
        slo: SloWindow,
        actuate: Actuator,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`instances_fn`: the registry's `Instance` objects (or `InstanceView`s, taken as they are);
        `interval_s`: default the planner config's."""
        self.planner = planner
        self._instances_fn = instances_fn
        self.slo = slo
        self._actuate = actuate
        self.interval_s = planner.config.interval_s if interval_s is None else interval_s
        self._clock = clock

    def views(self) -> list[InstanceView]:
        return [i if isinstance(i, InstanceView) else view_of(i) for i in self._instances_fn()]

    def run_once(self) -> list[Decision]:
        """One tick: decide, and act on the decisions in mode on."""
        decisions = self.planner.tick(self._clock(), self.views(), self.slo)
        if self.planner.config.mode == "on":
            for d in decisions:
                try:
                    self._actuate(d.instance_id, d.to_role, d.reason)
                except Exception:  # the instance left meanwhile, or the gateway refused the change
                    self.planner.metrics.actuation_errors.inc()
                    log.exception("planner: set_roles(%s, %s) failed", d.instance_id, d.to_role)
        return decisions

    async def run(self) -> None:
        """Tick until cancelled; in mode off, return at once."""
        if self.planner.config.mode == "off":
            return
        log.info("planner running in mode %s every %.3g s", self.planner.config.mode, self.interval_s)
        while True:
            try:
                self.run_once()
            except Exception:
                log.exception("planner tick failed")
            await asyncio.sleep(self.interval_s)
