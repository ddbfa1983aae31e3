"""Which roles one process may host together, checked the same way by the gateway and the stages.

A process hosts some of E, P and D, each once; E with D but without P is refused (the features would
have nowhere to go in the process, and the decode would need another prefill anyway). An empty set
is a drain: a role change to no role is an instance leaving the stack.
"""

from __future__ import annotations


def canonical_roles(roles: str) -> str:
    """The letters in E, P, D order, upper case: "dp" -> "PD"."""
    upper = roles.upper()
    return "".join(r for r in "EPD" if r in upper)


def roles_problem(roles: str) -> str | None:
    """Why `roles` cannot be one process's roles, or None ("" is a drain)."""
    upper = roles.upper()
    if set(upper) - set("EPD") or len(set(upper)) != len(upper):
        return f"roles must be some of E, P, D, each once; got {roles[:16]!r}"
    if "E" in upper and "D" in upper and "P" not in upper:
        return "E and D without P in one process is not a useful co-location"
    return None
