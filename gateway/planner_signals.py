"""What the role planner reads each tick, and the one number per role it decides on: its pressure.

Each tick the planner gets a view of every registered instance (`InstanceView`, from the registry's
`Instance`: roles, whether it is suspect or already changing roles, its last heartbeat's load). The
phase histograms in a heartbeat are totals since the process started (common/stage_histograms.py),
so `PhaseDeltas` keeps the previous totals and yields what happened since the last tick (a process
that restarted starts again from zero: its totals are then taken as they are).

A role's pressure is the largest of its signals, each divided by its target, so 1.0 means "at
target" for every role and pressures compare across roles:

  E  encode_queue items per E instance / `encode_queue`;  mean encode_queue time / (`queue_share` x TTFT SLO);
     prompts at P instances still missing features, per E instance / `prefill_waiting`;
     their mean feature_wait time / (`queue_share` x TTFT SLO)
  P  prompts waiting for compute per P instance / `prefill_waiting`;  mean prefill_queue time / (...)
  D  KV blocks in use / `kv_use`;  running per D instance / `decode_running`;
     mean decode_step time / TPOT SLO;  mean decode_queue time / (`queue_share` x TTFT SLO)

Counts are means over the role's live (not suspect) instances, because a move changes exactly that:
one more instance spreads the same load over n + 1. Times are the mean of what finished queueing in
the tick (sum over count of the differences: exact, where bucket percentiles would be coarse); a
tick where nothing left a queue gives no time, and a stuck queue still shows in its length.
Co-located instances (e.g. "PD") count for each role they host.

A prompt waiting at a prefill instance for its image features waits on the encoders, not on the
prefill: it counts for E (where one more instance would help), and only prompts with every feature
present count as P's waiting. The feature_wait phase is timed at the prefill instances, so E's
time signal reads the P instances' histograms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLE_PHASES = {"E": ("encode_queue",), "P": ("prefill_queue",), "D": ("decode_step", "decode_queue")}
# "E" signals timed where P runs: how long prompts waited there for the encoders' features
FEATURE_WAIT = "feature_wait"


@dataclass(slots=True)
class PressureTargets:
    """The load at which a role counts as fully pressed (pressure 1.0)."""

    encode_queue: float = 4.0  # images queued per E instance
    prefill_waiting: float = 4.0  # prompts waiting per P instance
    kv_use: float = 0.8  # share of a D instance's KV blocks in use
    decode_running: float = 48.0  # requests decoding per D instance (3/4 of `up`'s --max-num-seqs)
    queue_share: float = 0.25  # share of the TTFT SLO one queue may take

    def __post_init__(self) -> None:
        for name in ("encode_queue", "prefill_waiting", "kv_use", "decode_running", "queue_share"):
            if not getattr(self, name) > 0:
                raise ValueError(f"planner target {name} must be positive, got {getattr(self, name)}")


@dataclass(slots=True)
class InstanceView:
    """One instance as the planner sees it; `phases`: phase -> (count, sum of seconds) since start."""

    id: str
    roles: str
    suspect: bool = False
    pending: bool = False  # a role change was sent and has not finished
    waiting: int = 0
    running: int = 0
    encode_queue: int = 0
    feature_waiting: int = 0  # of `waiting`: prompts missing encoder features
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    phases: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def switchable(self) -> bool:
        """A single-role process, alive and not already changing: co-located ones are never moved."""
        return len(self.roles) == 1 and not self.suspect and not self.pending

    def busy(self) -> int:
        return self.waiting + self.running + self.encode_queue


def view_of(inst: Any) -> InstanceView:
    """The view of a gateway/registry.py `Instance` (read only; `pending_roles` may be absent)."""
    load = inst.load
    phases = {name: (snap.count, float(snap.sum)) for name, snap in load.phases.items()}
    return InstanceView(
        id=inst.id,
        roles=inst.info.roles,
        suspect=inst.suspect,
        pending=getattr(inst, "pending_roles", None) is not None,
        waiting=load.waiting,
        running=load.running,
        encode_queue=load.encode_queue,
        feature_waiting=load.feature_waiting,
        free_kv_blocks=load.free_kv_blocks,
        total_kv_blocks=load.total_kv_blocks,
        phases=phases,
    )


class PhaseDeltas:
    """Turns each instance's phase totals into what happened since the previous tick."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, tuple[int, float]]] = {}

    def step(self, views: list[InstanceView]) -> dict[str, dict[str, tuple[int, float]]]:
        out: dict[str, dict[str, tuple[int, float]]] = {}
        for v in views:
            before = self._last.get(v.id, {})
            mine: dict[str, tuple[int, float]] = {}
            for phase, (count, total) in v.phases.items():
                c0, s0 = before.get(phase, (0, 0.0))
                if count < c0:  # the process restarted: its totals began again
                    c0, s0 = 0, 0.0
                mine[phase] = (count - c0, max(0.0, total - s0))
            out[v.id] = mine
        self._last = {v.id: dict(v.phases) for v in views}  # instances gone are forgotten
        return out


@dataclass(slots=True)
class RoleSignals:
    """One role's figures this tick: how many live instances host it, its signals and pressure."""

    role: str
    count: int
    signals: dict[str, float] = field(default_factory=dict)  # raw values (per instance, seconds)
    pressure: float = 0.0  # max over the signals of value / target


def role_signals(
    views: list[InstanceView],
    deltas: dict[str, dict[str, tuple[int, float]]],
    targets: PressureTargets,
    ttft_s: float,
    tpot_s: float,
) -> dict[str, RoleSignals]:
    """Every role's signals and pressure from the live instances (see the module's docstring)."""
    out: dict[str, RoleSignals] = {}
    queue_budget = targets.queue_share * ttft_s
    for role in ("E", "P", "D"):
        live = [v for v in views if role in v.roles and not v.suspect]
        rs = RoleSignals(role, len(live))
        out[role] = rs
        if not live:
            continue
        n = len(live)
        ratios: list[float] = []
        times = {p: _mean_time(live, deltas, p) for p in ROLE_PHASES[role]}
        if role == "E":
            prefills = [v for v in views if "P" in v.roles and not v.suspect]
            _add(rs, ratios, "encode_queue", sum(v.encode_queue for v in live) / n, targets.encode_queue)
            _add(rs, ratios, "encode_queue_s", times["encode_queue"], queue_budget)
            missing = sum(v.feature_waiting for v in prefills) / n
            _add(rs, ratios, "feature_waiting", missing, targets.prefill_waiting)
            _add(rs, ratios, "feature_wait_s", _mean_time(prefills, deltas, FEATURE_WAIT), queue_budget)
        elif role == "P":
            ready = sum(v.waiting - v.feature_waiting for v in live) / n
            _add(rs, ratios, "waiting", ready, targets.prefill_waiting)
            _add(rs, ratios, "prefill_queue_s", times["prefill_queue"], queue_budget)
        else:
            total = sum(v.total_kv_blocks for v in live)
            used = sum(max(0, v.total_kv_blocks - v.free_kv_blocks) for v in live)
            _add(rs, ratios, "kv_use", used / total if total else None, targets.kv_use)
            _add(rs, ratios, "running", sum(v.running for v in live) / n, targets.decode_running)
            _add(rs, ratios, "decode_step_s", times["decode_step"], tpot_s)
            _add(rs, ratios, "decode_queue_s", times["decode_queue"], queue_budget)
        rs.pressure = max(ratios, default=0.0)
    return out


def _add(rs: RoleSignals, ratios: list[float], name: str, value: float | None, target: float) -> None:
    if value is None:
        return
    rs.signals[name] = value
    ratios.append(value / target)


def _mean_time(
    live: list[InstanceView], deltas: dict[str, dict[str, tuple[int, float]]], phase: str
) -> float | None:
    count = total = 0.0
    for v in live:
        c, s = deltas.get(v.id, {}).get(phase, (0, 0.0))
        count += c
        total += s
    return total / count if count else None
