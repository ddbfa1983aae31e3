"""The role planner: moves one instance at a time from the least pressed role to the most pressed.

Disaggregation fixes how many processes encode, prefill and decode, but the mix a workload needs
drifts (image-heavy traffic wants encoders; long answers want decoders). The planner watches each
role's pressure (gateway/planner_signals.py: 1.0 = at target, so roles compare) and, when one role
stays clearly more pressed than another, asks an instance of the lighter role to take the heavier
one (`SetRoles`, sent by the gateway's `set_roles`). A tick, every `interval_s`:

  1. views of the instances -> per-role signals and pressures -> desired counts (for an autoscaler)
  2. hysteresis, per ordered pair of roles (src, dst): the pair is *armed* when
     pressure[dst] - pressure[src] >= act_gap, and stays armed until the gap falls under
     stand_down_gap (a higher bar to start than to stop, so noise around one threshold does not flap)
  3. nothing moves while a role change is pending anywhere, or within cooldown_s of the last decision
  4. of the pairs armed for stable_s, the widest gap goes first, if it has a donor: an instance that
     hosts only src, is not suspect and not pending (the least busy one), with src staying at or over
     its minimum and dst at or under its maximum, and weights that allow it (P <-> D always; E <-> P/D
     only with allow_load_on_demand); and if the move helps: with the load spread over one instance
     less (src) and one more (dst), the donor role must not end up armed against the receiver
  5. the decision is logged and counted; every pair is disarmed (fresh evidence after a change)

Desired count of a role: ceil(live count x pressure), inside the limits (pressure 1 at one instance
per role: keep it; 2.4 at two: five). `tick` is pure: time comes in, decisions go out, and only
`PlannerLoop` (gateway/planner_loop.py) acts on them. Mode advise runs the same, and only logs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from prometheus_client.registry import Collector

from gateway.planner_config import ROLES, PlannerConfig
from gateway.planner_metrics import PlannerMetrics
from gateway.planner_signals import InstanceView, PhaseDeltas, RoleSignals, role_signals
from gateway.planner_slo import SloWindow

log = logging.getLogger("epd.gateway.planner")


@dataclass(slots=True)
class Decision:
    """Move `instance_id` from `from_role` to `to_role`; the rest is why, for the log and the reason."""

    instance_id: str
    from_role: str
    to_role: str
    mode: str
    at: float
    gap: float
    pressures: dict[str, float] = field(default_factory=dict)
    signals: dict[str, dict[str, float]] = field(default_factory=dict)
    attainment: float | None = None

    @property
    def reason(self) -> str:
        """One line for `set_roles(..., reason)` and the instance's own log."""
        p = self.pressures
        return (
            f"planner: {self.to_role} pressure {p.get(self.to_role, 0):.2f} over "
            f"{self.from_role} {p.get(self.from_role, 0):.2f} (gap {self.gap:.2f})"
        )

    def fields(self) -> dict[str, object]:
        """Flat key/values of the decision: the log line's fields."""
        out: dict[str, object] = {
            "mode": self.mode, "instance": self.instance_id, "from_role": self.from_role,
            "to_role": self.to_role, "gap": round(self.gap, 3),
            "attainment": None if self.attainment is None else round(self.attainment, 3),
        }  # fmt: skip
        for role in ROLES:
            out[f"pressure_{role}"] = round(self.pressures.get(role, 0.0), 3)
        for role in (self.from_role, self.to_role):
            for name, value in self.signals.get(role, {}).items():
                out[f"{role}.{name}"] = round(value, 4)
        return out


class Planner:
    def __init__(self, config: PlannerConfig, metrics: PlannerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or PlannerMetrics(config.mode)
        self._deltas = PhaseDeltas()
        self._armed: dict[tuple[str, str], float] = {}  # (src, dst) -> since when
        self._cooldown_until = -math.inf
        self.last_signals: dict[str, RoleSignals] = {}
        self.last_desired: dict[str, int] = {}

    def collectors(self) -> list[Collector]:
        """The planner's metrics, for the gateway to register in its own registry."""
        return self.metrics.collectors()

    def tick(self, now: float, instances: list[InstanceView], slo: SloWindow) -> list[Decision]:
        """One look at the cluster; returns the decisions taken now (at most one)."""
        cfg = self.config
        if cfg.mode == "off":
            return []
        deltas = self._deltas.step(instances)
        signals = role_signals(instances, deltas, cfg.targets, slo.ttft_s, slo.tpot_s)
        pressures = {r: s.pressure for r, s in signals.items()}
        self.last_signals = signals
        self.last_desired = desired_counts(signals, cfg)
        attainment = slo.attainment(now)
        self.metrics.publish(pressures, self.last_desired, attainment)
        self._rearm(now, pressures)
        if now < self._cooldown_until or any(v.pending for v in instances):
            return []
        ready = [
            (pressures[dst] - pressures[src], src, dst)
            for (src, dst), since in self._armed.items()
            if now - since >= cfg.stable_s
        ]
        for gap, src, dst in sorted(ready, reverse=True):
            donor = self._donor(src, dst, instances, signals)
            if donor is None:
                continue
            decision = Decision(
                donor.id, src, dst, cfg.mode, now, gap, pressures,
                {r: dict(s.signals) for r, s in signals.items()}, attainment,
            )  # fmt: skip
            self._cooldown_until = now + cfg.cooldown_s
            self._armed.clear()
            self.metrics.decided(src, dst, cfg.mode)
            log.info(
                "planner decision %s", " ".join(f"{k}={v}" for k, v in decision.fields().items()),
                extra={"planner_decision": decision.fields()},
            )  # fmt: skip
            return [decision]
        return []

    def _rearm(self, now: float, pressures: dict[str, float]) -> None:
        cfg = self.config
        for src in ROLES:
            for dst in ROLES:
                if not cfg.may_move(src, dst):
                    continue
                gap = pressures[dst] - pressures[src]
                pair = (src, dst)
                if pair in self._armed:
                    if gap < cfg.stand_down_gap:
                        del self._armed[pair]
                elif gap >= cfg.act_gap:
                    self._armed[pair] = now

    def _donor(
        self, src: str, dst: str, instances: list[InstanceView], signals: dict[str, RoleSignals]
    ) -> InstanceView | None:
        """The instance to move from src to dst, or None when the limits or the gain forbid it."""
        cfg = self.config
        n_src, n_dst = signals[src].count, signals[dst].count
        high = cfg.max_of(dst)
        if n_src - 1 < cfg.min_of(src) or (high is not None and n_dst + 1 > high):
            return None
        donors = [v for v in instances if v.roles == src and v.switchable]
        if not donors:
            return None
        # the same load over one instance less (src) and one more (dst)
        left = n_src - 1  # 0 only for a role whose minimum is 0: fine while it has no work
        p_src = signals[src].pressure
        after_src = p_src * n_src / left if left else (math.inf if p_src > 0 else 0.0)
        after_dst = signals[dst].pressure * n_dst / (n_dst + 1)
        if after_src - after_dst >= cfg.act_gap:
            log.debug("planner: moving %s -> %s would arm %s -> %s; not moving", src, dst, dst, src)
            return None
        return min(donors, key=lambda v: (v.busy(), v.id))


def desired_counts(signals: dict[str, RoleSignals], config: PlannerConfig) -> dict[str, int]:
    """Per role: ceil(live count x pressure), inside the operator's limits."""
    out = {}
    for role in ROLES:
        s = signals.get(role)
        want = math.ceil(s.count * s.pressure - 1e-9) if s is not None else 0
        out[role] = config.bounded(role, max(want, 1 if s is not None and s.count else 0))
    return out
