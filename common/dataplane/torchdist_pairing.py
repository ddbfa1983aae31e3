"""Which collective library a torchdist plane speaks, and whether two planes may form a pair.

Torch-free on purpose: the choice is a table from the device, and the refusal reads nothing but two
plain descriptor dicts, so both are decided (and tested) without a GPU, and a producer refuses a pair
that cannot work before it opens a process group that would hang or fail deep inside the library.

A plane's descriptor carries its device kind (`device`: cpu, cuda, npu) and, on CUDA, which physical
GPU that is (`device_uuid`, `device_pci`): indices say nothing across processes, since each process
may see a different `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

from typing import Any

from common.dataplane.factory import same_host

DIST_BACKENDS = ("gloo", "nccl", "hccl")
DEVICE_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # the device decides the library
_BACKEND_DEVICES = {backend: kind for kind, backend in DEVICE_BACKENDS.items()}


def choose(device: str | None = None, dist_backend: str | None = None) -> tuple[str, str]:
    """(device, dist backend) for a plane: the backend follows the device ("cuda:1" -> nccl).

    A backend named alone (the older way to configure the plane) picks its kind of device; naming
    both is allowed only when they agree, since gloo cannot send device memory point-to-point and
    nccl/hccl cannot send host memory.
    """
    if dist_backend is not None and dist_backend not in DIST_BACKENDS:
        raise ValueError(
            f"unknown torchdist backend {dist_backend!r}; choose one of {', '.join(DIST_BACKENDS)}"
        )
    if device is None:
        device = _BACKEND_DEVICES[dist_backend] if dist_backend is not None else "cpu"
    kind, colon, index = device.partition(":")
    if kind not in DEVICE_BACKENDS or (colon and not index.isdigit()):
        raise ValueError(f"torchdist cannot run on device {device!r}; devices: cpu, cuda[:N], npu[:N]")
    backend = DEVICE_BACKENDS[kind]
    if dist_backend is not None and dist_backend != backend:
        raise ValueError(
            f"torchdist backend {dist_backend!r} does not go with device {device!r}: {kind} memory "
            f"moves over {backend!r}"
        )
    return device, backend


def shared_device(mine: dict[str, Any], peer: dict[str, Any]) -> str | None:
    """The accelerator both descriptors name, or None when they are on different devices (or on host
    memory, or when a descriptor does not say).

    A device uuid is unique everywhere, so it decides alone when both sides give one; a PCI bus id
    is unique on one host only, so it counts when both descriptors come from the same host.
    """
    kind = mine.get("device")
    if kind in (None, "cpu") or peer.get("device") != kind:
        return None
    a, b = mine.get("device_uuid"), peer.get("device_uuid")
    if a and b:
        return f"{kind} device {a}" if a == b else None
    a, b = mine.get("device_pci"), peer.get("device_pci")
    if a and b and a == b and same_host(mine, peer):
        return f"{kind} device at PCI {a} on {mine.get('hostname')}"
    return None


def pairing_problem(mine: dict[str, Any], peer: dict[str, Any]) -> str | None:
    """Why the plane described by `mine` cannot open a process group with `peer`, or None."""
    ours, theirs = mine.get("dist_backend"), peer.get("dist_backend")
    if theirs != ours:
        return (
            f"the peer's torchdist plane speaks {theirs!r} (device {peer.get('device', '?')}), this "
            f"one {ours!r} (device {mine.get('device', '?')}): both ends of a pair need the same "
            "collective library, so the same kind of device"
        )
    if (device := shared_device(mine, peer)) is not None:
        return (
            f"this process and the peer both use {device}; {ours} cannot pair two ranks on one "
            "device. Processes that share a GPU need another path: host staging (a host-memory "
            "data plane such as --dataplane shm or tcp) or cudaipc"
        )
    return None
