"""Topology strings: which processes host which roles, and how many of each.

"E1 P1 D1" is full disaggregation, "EP1 D1" co-locates encode with prefill, "E1 PD1" keeps encode
apart with prefill and decode together, "EPD1" is monolithic, "E2 P1 D2" scales encode and decode.
Each group is the roles one process hosts followed by how many such processes to start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_GROUP = re.compile(r"^([A-Za-z]+)(\d+)$")


@dataclass(frozen=True, slots=True)
class ProcessGroup:
    roles: str  # canonical order: some of "EPD"
    count: int


@dataclass(frozen=True, slots=True)
class Topology:
    groups: tuple[ProcessGroup, ...]

    @property
    def num_processes(self) -> int:
        return sum(g.count for g in self.groups)

    def role_counts(self) -> dict[str, int]:
        return {r: sum(g.count for g in self.groups if r in g.roles) for r in "EPD"}

    def processes(self) -> list[str]:
        """The roles of each process to start, one entry per process."""
        return [g.roles for g in self.groups for _ in range(g.count)]

    def __str__(self) -> str:
        return " ".join(f"{g.roles}{g.count}" for g in self.groups)


def parse_topology(text: str) -> Topology:
    groups = []
    for token in text.replace(",", " ").split():
        m = _GROUP.match(token)
        if not m:
            raise ValueError(f"bad topology group {token!r}: write roles then a count, like 'EP1' or 'D2'")
        letters, count = m.group(1).upper(), int(m.group(2))
        if set(letters) - set("EPD") or len(set(letters)) != len(letters):
            raise ValueError(f"bad topology group {token!r}: roles are E, P and D, each at most once")
        if count < 1:
            raise ValueError(f"bad topology group {token!r}: the count must be at least 1")
        if "E" in letters and "D" in letters and "P" not in letters:
            raise ValueError(f"bad topology group {token!r}: E and D together need P too")
        groups.append(ProcessGroup("".join(r for r in "EPD" if r in letters), count))
    if not groups:
        raise ValueError("the topology is empty; try 'E1 P1 D1' or 'EPD1'")
    topo = Topology(tuple(groups))
    missing = [r for r, n in topo.role_counts().items() if n == 0]
    if missing:
        raise ValueError(f"topology {text!r} has no process for {', '.join(missing)}")
    return topo
