"""The `--planner*` flags of the gateway (`epd-serve gateway`, and `up` which passes them on).

Argparse only, no torch and nothing from services/: the gateway's command line must parse in a
blink. `planner_config_from_args` turns the flags into a checked `PlannerConfig`; a wrong value is
an argparse-style error naming the flag (docs/planner.md describes what each one does).
"""

from __future__ import annotations

import argparse

from gateway.planner_config import MODES, ROLES, PlannerConfig

_DEFAULTS = PlannerConfig()


def add_planner_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("role planner (docs/planner.md)")
    g.add_argument(
        "--planner", choices=MODES, default="off",
        help="move instances between roles by load: off (default), advise (decide, log and count in "
        "/metrics, change nothing), on (send the role changes)",
    )  # fmt: skip
    g.add_argument("--planner-interval", type=float, default=_DEFAULTS.interval_s, metavar="SECONDS",
                   help=f"seconds between two looks at the load (default {_DEFAULTS.interval_s:g})")  # fmt: skip
    g.add_argument(
        "--planner-stable-seconds", type=float, default=_DEFAULTS.stable_s, metavar="SECONDS",
        help=f"how long one role must stay more pressed than another before an instance moves "
        f"(default {_DEFAULTS.stable_s:g})",
    )  # fmt: skip
    g.add_argument(
        "--planner-cooldown-seconds", type=float, default=_DEFAULTS.cooldown_s, metavar="SECONDS",
        help=f"after a role change, seconds before the next one (default {_DEFAULTS.cooldown_s:g})",
    )  # fmt: skip
    g.add_argument(
        "--planner-min", action="append", default=[], metavar="ROLE=N",
        help="fewest instances of a role (E, P or D) the planner leaves, e.g. --planner-min D=2 "
        "(repeatable; default 1 per role; E may be 0)",
    )  # fmt: skip
    g.add_argument(
        "--planner-max", action="append", default=[], metavar="ROLE=N",
        help="most instances of a role the planner makes, e.g. --planner-max E=4 (repeatable; "
        "default: no maximum)",
    )  # fmt: skip
    g.add_argument(
        "--planner-load-on-demand", action="store_true",
        help="allow moves between E and P/D, whose instances must then load the weights they lack "
        "(default: off, only P <-> D, which share the language model)",
    )  # fmt: skip


def parse_role_counts(values: list[str], flag: str) -> dict[str, int]:
    """["D=2", "E=0"] -> {"D": 2, "E": 0}; a malformed entry raises ValueError naming `flag`."""
    out: dict[str, int] = {}
    for value in values:
        role, sep, count = value.partition("=")
        role = role.strip().upper()
        if not sep or role not in ROLES:
            raise ValueError(f"{flag} wants ROLE=N with ROLE one of {', '.join(ROLES)}, got {value!r}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"{flag} {value!r}: N must be a whole number") from None
        if n < 0:
            raise ValueError(f"{flag} {value!r}: N must be 0 or more")
        if role in out:
            raise ValueError(f"{flag} names {role} twice")
        out[role] = n
    return out


def planner_config_from_args(args: argparse.Namespace) -> PlannerConfig:
    """The checked config of the flags; raises ValueError with a message fit for the user."""
    return PlannerConfig(
        mode=args.planner,
        interval_s=args.planner_interval,
        stable_s=args.planner_stable_seconds,
        cooldown_s=args.planner_cooldown_seconds,
        min_per_role=parse_role_counts(args.planner_min, "--planner-min"),
        max_per_role=dict(parse_role_counts(args.planner_max, "--planner-max")),
        allow_load_on_demand=args.planner_load_on_demand,
    )


def planner_argv(config: PlannerConfig) -> list[str]:
    """The flags that give `config` again: what `up` appends to its `epd-serve gateway` child's
    command (cli/gateway_process.py), so the child plans exactly as `up` was told. Empty when off."""
    if config.mode == "off":
        return []
    argv = [
        "--planner", config.mode,
        "--planner-interval", repr(config.interval_s),
        "--planner-stable-seconds", repr(config.stable_s),
        "--planner-cooldown-seconds", repr(config.cooldown_s),
    ]  # fmt: skip
    argv += [f"--planner-min={role}={n}" for role, n in config.min_per_role.items()]
    argv += [f"--planner-max={role}={n}" for role, n in config.max_per_role.items() if n is not None]
    if config.allow_load_on_demand:
        argv.append("--planner-load-on-demand")
    return argv
