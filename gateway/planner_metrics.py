"""The planner's figures for /metrics: its mode, each role's pressure, the instances it would want,
and every decision it took (acted on or only advised).

`epd_planner_desired_instances` is meant for an autoscaler: the count each role would have with
unlimited instances, inside the operator's limits. Like gateway/instance_metrics.py `StageTimings`,
the metrics are in no registry: the gateway registers `collectors()` in its own.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from prometheus_client.registry import Collector

from gateway.planner_config import MODES, ROLES


class PlannerMetrics:
    def __init__(self, mode: str) -> None:
        self.decisions = Counter(
            "epd_planner_decisions",
            "Role changes the planner decided, by the role left, the role taken and the mode it ran in "
            "(advise: decided and logged, not acted on).",
            ["from_role", "to_role", "mode"],
            registry=None,
        )
        self.actuation_errors = Counter(
            "epd_planner_actuation_errors",
            "Role changes decided in mode on that the gateway could not send (e.g. the instance left).",
            registry=None,
        )
        self.desired = Gauge(
            "epd_planner_desired_instances",
            "Instances the planner would want for a role with unlimited instances, inside the operator's "
            "limits (for an autoscaler).",
            ["role"],
            registry=None,
        )
        self.pressure = Gauge(
            "epd_planner_pressure",
            "A role's load against its target (1 = at target), the larger of its signals (docs/planner.md).",
            ["role"],
            registry=None,
        )
        self.attainment = Gauge(
            "epd_planner_slo_attainment",
            "Share of the requests of the SLO window that met both the TTFT and the TPOT SLO (NaN: none).",
            registry=None,
        )
        self.mode = Gauge(
            "epd_planner_mode", "1 for the planner's mode (off, advise, on), 0 for the others.", ["mode"],
            registry=None,
        )  # fmt: skip
        for m in MODES:
            self.mode.labels(mode=m).set(1.0 if m == mode else 0.0)
        for role in ROLES:  # the series exist from the start, before the first tick
            self.desired.labels(role=role)
            self.pressure.labels(role=role)
        self.attainment.set(float("nan"))

    def collectors(self) -> list[Collector]:
        return [
            self.decisions,
            self.actuation_errors,
            self.desired,
            self.pressure,
            self.attainment,
            self.mode,
        ]

    def publish(self, pressures: dict[str, float], desired: dict[str, int], attainment: float | None) -> None:
        for role in ROLES:
            self.pressure.labels(role=role).set(pressures.get(role, 0.0))
            if role in desired:
                self.desired.labels(role=role).set(desired[role])
        self.attainment.set(float("nan") if attainment is None else attainment)

    def decided(self, from_role: str, to_role: str, mode: str) -> None:
        self.decisions.labels(from_role=from_role, to_role=to_role, mode=mode).inc()
