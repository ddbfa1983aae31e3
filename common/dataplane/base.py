"""The data plane's contract: consumers own memory, producers write into regions of it.

Bulk bytes (encoder features, KV cache blocks) do not ride the control plane. A consumer (prefill for
features, decode for KV blocks) allocates or registers destination buffers, publishes `descriptor()` on
the control plane, and calls `expect()` with the regions a transfer will fill. A producer calls `write()`
with the consumer's descriptor and (source, region) pairs; it returns at once and the bytes move on a
background thread. Both sides track progress through a `TransferHandle` that is polled, never awaited
on the compute thread: `poll()` is non-blocking, `abort()` gives up on a transfer on either side.

The life of one transfer, as the consumer sees it: expect() -> PENDING -> first bytes -> TRANSFERRING ->
every region covered -> SUCCESS; or abort()/producer cancel/bad bytes -> FAILED. Bytes may arrive before
expect() (the producer prefetches); the plane remembers them and the later expect() sees them at once.

Memory is host memory unless a backend says otherwise: `DataPlane.devices` names the kinds of memory
(torch's device types) a plane reads as sources and adopts as destinations, and a plane refuses the
others with an error saying so (or, for a source, may copy it to host). A producer whose data sits on
a device the plane does not list stages it through host memory itself.
"""

from __future__ import annotations

import abc
import enum
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import msgspec


class TransferState(enum.Enum):
    """Where a transfer stands; SUCCESS and FAILED are final."""

    PENDING = "pending"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


class Region(msgspec.Struct, frozen=True):
    """A destination inside a consumer's registered buffer: `length` bytes from `offset`."""

    buffer_id: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class TransferHandle:
    """One transfer as seen by one side; thread-safe, so I/O threads update it while others poll.

    Backends move it forward with `add_bytes`, `succeed` and `fail`; users only read it and `abort()`.
    """

    def __init__(self, transfer_id: str, on_abort: Callable[[TransferHandle], None] | None = None) -> None:
        self.transfer_id = transfer_id
        self._on_abort = on_abort
        self._cond = threading.Condition()
        self._state = TransferState.PENDING
        self._failure: str | None = None
        self._bytes = 0
        self._first: float | None = None
        self._last: float | None = None
        self._done_callbacks: list[Callable[[TransferHandle], None]] = []

    def on_done(self, callback: Callable[[TransferHandle], None]) -> None:
        """Call `callback(handle)` once the transfer succeeds or fails (at once if it already has), on
        whichever thread finishes it: a compute loop can sleep until then instead of polling."""
        with self._cond:
            if not self._state.done:
                self._done_callbacks.append(callback)
                return
        callback(self)

    def __repr__(self) -> str:
        return f"TransferHandle({self.transfer_id!r}, {self._state.value}, bytes={self._bytes})"

    def poll(self) -> TransferState:
        """The current state; never blocks."""
        return self._state

    def wait(self, timeout: float) -> TransferState:
        """Block up to `timeout` seconds for a final state; returns the state either way."""
        with self._cond:
            self._cond.wait_for(lambda: self._state.done, timeout=max(0.0, timeout))
            return self._state

    def abort(self) -> None:
        """Give up: the state becomes FAILED and later bytes for this transfer are dropped.

        Safe to call twice, and a no-op once the transfer has succeeded.
        """
        if not self.fail("aborted"):
            return
        if self._on_abort is not None:
            self._on_abort(self)

    def failure(self) -> str | None:
        """Why the transfer failed, or None."""
        return self._failure

    @property
    def bytes(self) -> int:
        """Bytes moved so far."""
        return self._bytes

    @property
    def first_byte_at(self) -> float | None:
        """When the first bytes landed (time.monotonic()), None before any: where a transfer's time
        starts for whoever times it end to end."""
        return self._first

    @property
    def seconds(self) -> float:
        """Time from the first to the last byte (0.0 before two byte events)."""
        first, last = self._first, self._last
        return 0.0 if first is None or last is None else last - first

    # -- for backends ---------------------------------------------------------------------------------

    def add_bytes(self, n: int, start: float | None = None, end: float | None = None) -> None:
        """Count `n` bytes that landed between `start` and `end` (monotonic times; default now)."""
        now = time.monotonic()
        with self._cond:
            if self._state.done:
                return
            self._bytes += n
            self._first = min(self._first, start or now) if self._first is not None else (start or now)
            self._last = max(self._last or 0.0, end or now)
            self._state = TransferState.TRANSFERRING

    def succeed(self) -> bool:
        """Mark SUCCESS unless already final; True when this call made the change."""
        return self._finish(TransferState.SUCCESS, None)

    def fail(self, reason: str) -> bool:
        """Mark FAILED with `reason` unless already final; True when this call made the change."""
        return self._finish(TransferState.FAILED, reason)

    def _finish(self, state: TransferState, reason: str | None) -> bool:
        with self._cond:
            if self._state.done:
                return False
            self._state, self._failure = state, reason
            self._cond.notify_all()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            callback(self)
        return True


Source = Any  # memoryview | bytes | bytearray | numpy.ndarray | torch.Tensor (host, or a device in `devices`)


def device_type(obj: Any) -> str:
    """The kind of memory behind a source or buffer: a torch tensor's device type, else "cpu".

    Torch is never imported here; a tensor is recognised only when torch is already loaded.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.device.type
    return "cpu"


class DataPlane(abc.ABC):
    """One process's end of the data plane: consumer of some transfers, producer of others.

    Counters `bytes_sent`, `bytes_received`, `seconds_sent`, `seconds_received` are plain numbers for the
    service to export as metrics: bytes as they move, seconds per finished transfer (first to last byte).
    """

    backend: ClassVar[str]
    # The kinds of memory (torch device types) this plane reads and writes; "cpu" is host memory.
    # A backend that moves device memory lists its device here (on the instance when it depends on
    # how the plane was made, as for torchdist).
    devices: tuple[str, ...] = ("cpu",)
    # Seconds after a consumer's abort() during which bytes of that transfer may still land in its
    # memory (a producer finishing the chunk or batch it had started): the consumer must not hand that
    # memory to anyone else before (fence, then free). 0: nothing lands once abort() returns (the
    # bytes are copied under the ledger's lock).
    abort_fence_s: float = 0.0

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds_sent = 0.0
        self.seconds_received = 0.0
        self._counter_lock = threading.Lock()

    @abc.abstractmethod
    def descriptor(self) -> dict[str, Any]:
        """A msgpack-able dict a producer needs to reach this consumer; sent on the control plane."""

    # -- consumer side --------------------------------------------------------------------------------

    @abc.abstractmethod
    def allocate(self, buffer_id: str, nbytes: int) -> memoryview:
        """Create destination memory owned by the plane; returns a writable byte view of it."""

    @abc.abstractmethod
    def register(self, buffer_id: str, buffer: Any) -> None:
        """Adopt existing writable memory (bytearray, numpy array, torch tensor) as a destination.

        A tensor must live in host memory or on a device in `devices` (else ValueError).
        """

    @abc.abstractmethod
    def expect(self, transfer_id: str, regions: Sequence[Region]) -> TransferHandle:
        """A handle that turns SUCCESS once every region has been fully written."""

    @abc.abstractmethod
    def free(self, buffer_id: str) -> None:
        """Forget a buffer (and release it if the plane allocated it); unknown ids are ignored."""

    # -- producer side --------------------------------------------------------------------------------

    @abc.abstractmethod
    def write(
        self, peer: dict[str, Any], transfer_id: str, items: Sequence[tuple[Source, Region]]
    ) -> TransferHandle:
        """Start copying each source into its region of `peer`; returns at once.

        Sources must stay unmodified until the handle is final: they are read in place (zero copy).
        A device tensor is read where it is when its device is in `devices`; a backend that does not
        list it refuses it or copies it to host first.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop threads, close sockets, release memory; idempotent."""

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count_sent(self, nbytes: int, seconds: float) -> None:
        with self._counter_lock:
            self.bytes_sent += nbytes
            self.seconds_sent += seconds

    def count_received(self, nbytes: int = 0, seconds: float = 0.0) -> None:
        with self._counter_lock:
            self.bytes_received += nbytes
            self.seconds_received += seconds
