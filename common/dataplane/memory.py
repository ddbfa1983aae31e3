"""Byte views of sources and destinations, and the consumer's table of registered buffers.

Every backend moves flat bytes, so anything a caller hands over (bytes, bytearray, memoryview, numpy
array, contiguous torch tensor) is turned into a 1-D unsigned-byte memoryview over the same memory: no
copy unless the source is not contiguous. Torch is never imported here; a tensor is recognised only when
torch is already loaded (whoever made the tensor loaded it).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np

from common.dataplane.base import Region


def _torch_tensor(obj: Any) -> Any | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj
    return None


def _tensor_bytes(tensor: Any, *, writable: bool) -> np.ndarray:
    """A uint8 numpy view of a tensor's memory (the array keeps the tensor alive)."""
    import torch  # already imported: the caller holds a tensor

    t = tensor.detach()
    if t.device.type != "cpu":
        if writable:
            raise ValueError(f"a destination tensor must live in CPU memory, not on {t.device}")
        t = t.cpu()
    if not t.is_contiguous():
        if writable:
            raise ValueError("a destination tensor must be contiguous")
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()


def _array_bytes(arr: np.ndarray, *, writable: bool) -> np.ndarray:
    if arr.dtype.hasobject:
        raise TypeError("arrays of Python objects cannot be transferred")
    if not arr.flags.c_contiguous:
        if writable:
            raise ValueError("a destination array must be C-contiguous")
        arr = np.ascontiguousarray(arr)
    if writable and not arr.flags.writeable:
        raise ValueError("a destination array must be writable")
    return arr.reshape(-1).view(np.uint8)


def byte_view(obj: Any, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte memoryview over `obj`'s memory, zero-copy when it is contiguous."""
    tensor = _torch_tensor(obj)
    if tensor is not None:
        obj = _tensor_bytes(tensor, writable=writable)
    if isinstance(obj, np.ndarray):
        return memoryview(_array_bytes(obj, writable=writable))
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"cannot transfer {type(obj).__name__}: it does not expose a byte buffer") from None
    if writable and view.readonly:
        raise ValueError(f"a destination must be writable memory, {type(obj).__name__} is read-only")
    if not view.c_contiguous:
        if writable:
            raise ValueError("a destination buffer must be C-contiguous")
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class BufferTable:
    """The consumer's destinations by buffer id, with every region checked against its buffer."""

    def __init__(self) -> None:
        self._views: dict[str, memoryview] = {}
        self._lock = threading.Lock()

    def add(self, buffer_id: str, view: memoryview) -> None:
        with self._lock:
            if buffer_id in self._views:
                raise ValueError(f"buffer {buffer_id!r} is already registered; free() it first")
            self._views[buffer_id] = view

    def remove(self, buffer_id: str) -> memoryview | None:
        with self._lock:
            return self._views.pop(buffer_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._views)

    def size(self, buffer_id: str) -> int | None:
        view = self._views.get(buffer_id)
        return None if view is None else view.nbytes

    def problem(self, region: Region) -> str | None:
        """Why `region` is not a valid destination, or None when it is."""
        size = self.size(region.buffer_id)
        if size is None:
            return f"unknown buffer {region.buffer_id!r}"
        if region.offset < 0 or region.length < 0 or region.end > size:
            return (
                f"region [{region.offset}, {region.end}) lies outside buffer {region.buffer_id!r} "
                f"of {size} bytes"
            )
        return None

    def view(self, buffer_id: str, start: int, end: int) -> memoryview | None:
        """The bytes [start, end) of a buffer, or None when the buffer is unknown or too small."""
        view = self._views.get(buffer_id)
        if view is None or start < 0 or end < start or end > view.nbytes:
            return None
        return view[start:end]


class HostBuffers:
    """Destination memory in this process's heap, kept in `self.buffers` (a BufferTable): what every
    backend whose bytes arrive through this process (fake, tcp, torchdist) allocates and adopts."""

    buffers: BufferTable

    def allocate(self, buffer_id: str, nbytes: int) -> memoryview:
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        view = memoryview(bytearray(nbytes))
        self.buffers.add(buffer_id, view)
        return view

    def register(self, buffer_id: str, buffer: Any) -> None:
        self.buffers.add(buffer_id, byte_view(buffer, writable=True))

    def free(self, buffer_id: str) -> None:
        self.buffers.remove(buffer_id)
