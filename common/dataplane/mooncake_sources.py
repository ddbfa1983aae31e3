"""Which memory a mooncake plane has registered with its engine, and how a producer's sources get there.

Mooncake reads and writes only registered memory (RDMA needs the NIC's key for both ends; its TCP
transport checks the destination too), registrations may not overlap, and with RDMA registering is a
system call that pins every page. So a plane keeps one table of registered ranges: its destination
buffers, the small per-peer scratch it needs, and pinned producer memory.

Where sources come from decides what is sensible for them:

- KV blocks are views into the prefill engine's KV pool, one long-lived allocation: the first write
  from it registers the whole pool (the tensor's storage), and every later view of it is read in place.
- Encoder features are rows of an encoder batch's output: the batch output is registered once and its
  items are read in place. Any other tensor or array of at least `pin_min_bytes` is treated the same.
- Anything else (bytes, bytearrays, smaller arrays, memory that overlaps a registration already made)
  is copied through a registered staging buffer per peer.

Pinned memory is registered for as long as its owner lives, never longer: the table holds only a weak
reference to the owning tensor or array, and unregisters it when the owner is collected (before its
memory is released, so no registration ever outlives the pages it names). A write in flight keeps its
sources, and so their owners, alive.
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import weakref
from typing import Any

import numpy as np

log = logging.getLogger("epd.dataplane")


def address_of(view: memoryview) -> int:
    """The address of a flat byte view's first byte (read-only views too)."""
    if view.nbytes == 0:
        return 0
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def backing_of(view: memoryview) -> tuple[int, int, Any] | None:
    """(address, nbytes, owner) of the whole allocation a source view lies in, when one can be named.

    The owner is the tensor or array whose death releases that memory; None when the view's memory
    belongs to an object we cannot follow (bytes, bytearray, foreign buffers).
    """
    obj: Any = view.obj
    if not isinstance(obj, np.ndarray):
        return None
    while isinstance(obj.base, np.ndarray):
        obj = obj.base
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj.base, torch.Tensor):
        tensor = obj.base._base if obj.base._base is not None else obj.base
        storage = tensor.untyped_storage()
        return int(storage.data_ptr()), int(storage.nbytes()), tensor
    if obj.base is not None and not isinstance(obj.base, (bytes, memoryview)):
        return None  # e.g. a bytearray or an mmap: it can change size or go without telling the array
    return int(obj.ctypes.data), int(obj.nbytes), obj


class Registry:
    """Registered ranges of one engine, by start address; thread-safe (senders, compute, finalizers)."""

    def __init__(self, engine: Any, *, pin_min_bytes: int) -> None:
        self.engine = engine
        self.pin_min_bytes = pin_min_bytes
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._pins: dict[int, weakref.finalize] = {}
        self._lock = threading.RLock()  # a finalizer may run while this thread holds it

    def add(self, address: int, nbytes: int) -> None:
        """Register [address, address + nbytes); raises if it overlaps a registration or the engine says no."""
        with self._lock:
            if self._overlaps(address, nbytes):
                raise ValueError(
                    f"memory at {address:#x} (+{nbytes}) overlaps memory already registered with this plane"
                )
            rc = self.engine.register_memory(address, nbytes)
            if rc != 0:
                raise RuntimeError(f"mooncake could not register {nbytes} bytes at {address:#x} (code {rc})")
            i = bisect.bisect_left(self._starts, address)
            self._starts.insert(i, address)
            self._ends.insert(i, address + nbytes)

    def remove(self, address: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, address)
            if i == len(self._starts) or self._starts[i] != address:
                return
            del self._starts[i], self._ends[i]
            pin = self._pins.pop(address, None)
            if pin is not None:
                pin.detach()
            rc = self.engine.unregister_memory(address)
            if rc != 0:
                log.warning("mooncake could not unregister memory at %#x (code %d)", address, rc)

    def covers(self, address: int, nbytes: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._starts, address) - 1
            return i >= 0 and address + nbytes <= self._ends[i]

    def locate(self, view: memoryview) -> int | None:
        """The address to read a source from in place, pinning its owner's memory if need be; None when
        the source has to be staged."""
        address = address_of(view)
        if view.nbytes == 0 or self.covers(address, view.nbytes):
            return address
        backing = backing_of(view)
        if backing is None or backing[1] < self.pin_min_bytes:
            return None
        start, nbytes, owner = backing
        if not start <= address <= address + view.nbytes <= start + nbytes:
            return None  # not the allocation we took it for: do not guess
        with self._lock:
            if self.covers(address, view.nbytes):  # another sender pinned it meanwhile
                return address
            if self._overlaps(start, nbytes):
                return None
            try:
                self.add(start, nbytes)
                pin = weakref.finalize(owner, self.remove, start)
            except (RuntimeError, TypeError) as exc:  # refused by the engine, or no weak reference
                self.remove(start)
                log.info("staging a source instead of pinning %d bytes: %s", nbytes, exc)
                return None
            pin.atexit = False
            self._pins[start] = pin
            log.debug("pinned %d bytes of producer memory at %#x", nbytes, start)
        return address

    def close(self) -> None:
        """Unregister everything (the engine is about to go)."""
        with self._lock:
            for start in list(self._starts):
                self.remove(start)

    def _overlaps(self, address: int, nbytes: int) -> bool:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self._ends[i] > address:
            return True
        j = i + 1
        return j < len(self._starts) and self._starts[j] < address + nbytes
