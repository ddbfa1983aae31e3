"""Which device each stage process of `epd-serve up` runs on, and how the child is told.

A stack on a multi-GPU host spreads its processes over the devices of `--devices` round-robin, in
topology order; `--devices-for ROLES=LIST` gives the processes hosting exactly those roles a list
of their own (also round-robin, counted over those processes only). Several processes may share
a device: the default list is `0`, every process on one device, the one-GPU case.

A child sees only its own device: `CUDA_VISIBLE_DEVICES` (cuda) or `ASCEND_RT_VISIBLE_DEVICES` (npu)
is set to one entry and the child is told `--device cuda` / `npu`, so inside it the device is index
0 whichever physical device it is. When this process itself runs under such a variable, the indices
count the devices it lets through (index 1 of `CUDA_VISIBLE_DEVICES=4,5` is device 5), as in torch.
On cpu nothing is set.

Plain Python on purpose: `epd-serve up --help` and the gateway side must never import torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

VISIBLE_DEVICES = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
DEVICE_KINDS = ("cpu", *VISIBLE_DEVICES)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one stage process goes."""

    roles: str
    device: str  # what the child is told: cpu, cuda or npu
    index: int | None = None  # the device's index in --devices terms; None on cpu
    env: dict[str, str] = field(default_factory=dict)  # set in the child's environment
    sharing: int = 1  # processes placed on this device, this one included

    def describe(self) -> str:
        """'cuda device 1 (CUDA_VISIBLE_DEVICES=1, shared by 2)', for the log."""
        if self.index is None:
            return self.device
        where = ", ".join(f"{k}={v}" for k, v in self.env.items())
        shared = f", shared by {self.sharing}" if self.sharing > 1 else ""
        return f"{self.device} device {self.index} ({where}{shared})"


def parse_devices(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: device indices, each once."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit():
            raise ValueError(f"bad device list {text!r}: write device indices like 0 or 0,1,2")
        if int(part) in out:
            raise ValueError(f"bad device list {text!r}: device {part} is listed twice")
        out.append(int(part))
    return out


def parse_roles(text: str) -> str:
    """'pe' -> 'EP': roles in canonical order, as the topology writes them."""
    letters = text.strip().upper()
    if not letters or set(letters) - set("EPD") or len(set(letters)) != len(letters):
        raise ValueError(f"bad roles {text!r}: some of E, P, D, each once, as in the topology")
    return "".join(r for r in "EPD" if r in letters)


def parse_role_devices(text: str) -> tuple[str, list[int]]:
    """'D=1,2' -> ('D', [1, 2])."""
    roles, sep, devices = text.partition("=")
    if not sep:
        raise ValueError(f"bad --devices-for {text!r}: write ROLES=LIST, e.g. D=1,2 or EP=0")
    return parse_roles(roles), parse_devices(devices)


def devices_arg(text: str) -> list[int]:
    """argparse type of --devices."""
    try:
        return parse_devices(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def role_devices_arg(text: str) -> tuple[str, list[int]]:
    """argparse type of --devices-for."""
    try:
        return parse_role_devices(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def place(
    processes: Sequence[str],
    device: str,
    devices: Sequence[int] | None = None,
    devices_for: Sequence[tuple[str, Sequence[int]]] = (),
    environ: Mapping[str, str] | None = None,
) -> list[Placement]:
    """One placement per process (`processes`: each one's roles, in topology order).

    `devices` None means the default, `[0]`; `environ` is this process's environment (only its
    visible-devices variable is read). Raises ValueError with a message for the user.
    """
    if device not in DEVICE_KINDS:
        if device.partition(":")[0] in VISIBLE_DEVICES:
            raise ValueError(
                f"--device {device}: up places each process itself; write --device "
                f"{device.partition(':')[0]} --devices {device.partition(':')[2] or '0'}"
            )
        raise ValueError(f"unknown device {device!r}: one of {', '.join(DEVICE_KINDS)}")
    if device == "cpu":
        if devices is not None or devices_for:
            raise ValueError(
                "--devices and --devices-for place processes on accelerators; with --device cpu "
                "there is nothing to place (pin cores with --cpus or --pin)"
            )
        return [Placement(roles, "cpu") for roles in processes]
    lists = _role_lists(processes, devices_for)
    default = list(devices) if devices is not None else [0]
    if not default:
        raise ValueError("--devices is empty: name at least one device index")
    visible = _visible(device, environ or {})
    turns: dict[str, int] = {}
    chosen: list[int] = []
    for roles in processes:
        key = roles if roles in lists else ""
        options = lists.get(roles, default)
        chosen.append(options[turns.get(key, 0) % len(options)])
        turns[key] = turns.get(key, 0) + 1
    var = VISIBLE_DEVICES[device]
    return [
        Placement(roles, device, index, {var: _physical(index, visible, var)}, chosen.count(index))
        for roles, index in zip(processes, chosen, strict=True)
    ]


def _role_lists(
    processes: Sequence[str], devices_for: Sequence[tuple[str, Sequence[int]]]
) -> dict[str, list[int]]:
    lists: dict[str, list[int]] = {}
    for roles, devices in devices_for:
        roles = parse_roles(roles)
        if roles in lists:
            raise ValueError(f"--devices-for {roles} is given twice")
        if roles not in processes:
            present = ", ".join(dict.fromkeys(processes))
            raise ValueError(
                f"--devices-for {roles}: no process hosts exactly the roles {roles} "
                f"(the topology's processes host: {present})"
            )
        if not devices:
            raise ValueError(f"--devices-for {roles}: the list is empty")
        lists[roles] = list(devices)
    return lists


def _visible(device: str, environ: Mapping[str, str]) -> list[str] | None:
    """The entries of this process's own visible-devices variable, or None when it is unset."""
    value = environ.get(VISIBLE_DEVICES[device])
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _physical(index: int, visible: list[str] | None, var: str) -> str:
    if visible is None:
        return str(index)
    if index >= len(visible):
        through = f"indices 0 to {len(visible) - 1}" if visible else "none"
        raise ValueError(
            f"device {index} is not visible: {var}={','.join(visible)!r} lets {len(visible)} "
            f"device(s) through ({through})"
        )
    return visible[index]
