"""What the operator sets for the role planner (gateway/planner.py), checked once at start-up.

A role change is expensive (the instance drains or hands off what it holds, frees one role's memory
and builds another's), so every setting errs on the side of acting rarely: a gap between two roles
must last `stable_s` before anything moves, and after a move nothing else moves for `cooldown_s`.
The limits are the operator's word on how few and how many instances a role may have; the planner
never goes past them, and the desired counts it publishes for an autoscaler stay inside them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.planner_signals import PressureTargets

ROLES = ("E", "P", "D")
MODES = ("off", "advise", "on")
# the roles without which no request can be served: their minimum is at least 1
REQUIRED_ROLES = ("P", "D")


@dataclass(slots=True)
class PlannerConfig:
    """`mode`: off (no planner), advise (decide, log and count, change nothing), on (act).

    `act_gap` and `stand_down_gap` are differences of normalised pressures (1.0 = a role at its
    target, gateway/planner_signals.py): a pair of roles is armed when the more pressed one is
    `act_gap` above the other and stays armed until the gap falls under `stand_down_gap`."""

    mode: str = "off"
    interval_s: float = 1.0  # between two ticks
    stable_s: float = 30.0  # a pair of roles armed this long before a move
    cooldown_s: float = 120.0  # after a decision, no other one
    act_gap: float = 0.5
    stand_down_gap: float = 0.2
    min_per_role: dict[str, int] = field(default_factory=dict)  # missing roles: 1
    max_per_role: dict[str, int | None] = field(default_factory=dict)  # missing roles: no maximum
    # E <-> P/D moves need the instance to load weights it does not hold (the vision tower, or the
    # language model); off unless the deployment supports loading parts on demand
    allow_load_on_demand: bool = False
    targets: PressureTargets = field(default_factory=PressureTargets)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"planner mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.interval_s > 0:
            raise ValueError(f"planner interval_s must be positive, got {self.interval_s}")
        for name in ("stable_s", "cooldown_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"planner {name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.stand_down_gap < self.act_gap:
            raise ValueError(
                f"planner gaps must satisfy 0 <= stand_down_gap < act_gap (hysteresis), got "
                f"stand_down_gap={self.stand_down_gap}, act_gap={self.act_gap}"
            )
        _check_roles("min_per_role", self.min_per_role)
        _check_roles("max_per_role", self.max_per_role)
        for role in ROLES:
            low, high = self.min_of(role), self.max_of(role)
            floor = 1 if role in REQUIRED_ROLES else 0
            if low < floor:
                raise ValueError(f"planner minimum for {role} must be at least {floor}, got {low}")
            if high is not None and high < low:
                raise ValueError(f"planner maximum for {role} ({high}) is under its minimum ({low})")

    def min_of(self, role: str) -> int:
        return self.min_per_role.get(role, 1)

    def max_of(self, role: str) -> int | None:
        return self.max_per_role.get(role)

    def bounded(self, role: str, count: int) -> int:
        """`count` moved inside the role's limits."""
        high = self.max_of(role)
        count = max(count, self.min_of(role))
        return count if high is None else min(count, high)

    def may_move(self, src: str, dst: str) -> bool:
        """Whether an instance holding only `src` can become `dst` from the weights it has: P and D
        share the language model; the encoder is another part, loaded only on demand."""
        if src == dst:
            return False
        return {src, dst} == {"P", "D"} or self.allow_load_on_demand


def _check_roles(name: str, limits: dict) -> None:
    for role, value in limits.items():
        if role not in ROLES:
            raise ValueError(f"planner {name}: unknown role {role!r}; the roles are {', '.join(ROLES)}")
        if value is None and name == "max_per_role":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"planner {name}[{role}] must be a whole number of instances, got {value!r}")
