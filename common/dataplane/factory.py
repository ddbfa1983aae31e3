"""Pick a data-plane backend by name; each backend's module (and torch, for torchdist) loads on demand."""

from __future__ import annotations

import importlib
from typing import Any

from common.dataplane.base import DataPlane

BACKENDS = ("fake", "shm", "tcp", "cudaipc", "torchdist", "mooncake", "nixl")

_CLASSES = {
    "fake": ("common.dataplane.fake", "FakeDataPlane"),
    "shm": ("common.dataplane.shm", "ShmDataPlane"),
    "tcp": ("common.dataplane.tcp", "TcpDataPlane"),
    "cudaipc": ("common.dataplane.cudaipc", "CudaIpcDataPlane"),
    "torchdist": ("common.dataplane.torchdist", "TorchDistDataPlane"),
    "mooncake": ("common.dataplane.mooncake", "MooncakeDataPlane"),
    "nixl": ("common.dataplane.nixl", "NixlDataPlane"),
}


def resolve_backend(name: str, same_host: bool, device: str = "cpu") -> str:
    """The concrete backend for a configured name. "auto": across hosts tcp; on one host cudaipc when
    the memory is on a CUDA device (device to device), else shm."""
    if name == "auto":
        if not same_host:
            return "tcp"
        return "cudaipc" if device.partition(":")[0] == "cuda" else "shm"
    if name not in BACKENDS:
        raise ValueError(f"unknown data-plane backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return name


def create_dataplane(backend: str, *, host: str = "127.0.0.1", **options: Any) -> DataPlane:
    """A data plane bound on `host`; options go to the backend (chunk_bytes, dist_backend, ttl, ...).

    "auto" here means "shm": a consumer does not know its producers yet, and on one host shared memory
    wins; deployments spanning hosts should name "tcp" (or use resolve_backend with what they know).
    """
    name = resolve_backend(backend, same_host=True)
    module_name, class_name = _CLASSES[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(host=host, **options)


def same_host(desc_a: dict[str, Any], desc_b: dict[str, Any]) -> bool:
    """Whether two descriptors come from one machine (same hostname and boot), so shm can connect them."""
    keys = ("hostname", "boot_id")
    if any(not desc_a.get(k) or not desc_b.get(k) for k in keys):
        return False
    return all(desc_a[k] == desc_b[k] for k in keys)
