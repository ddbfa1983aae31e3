"""The consumer's bookkeeping: which bytes of which transfer have landed, and when it is complete.

A transfer is complete when the written intervals cover every expected region, whatever the producer's
granularity (whole regions, chunks, one write per layer). Three kinds of entries:

- active: expect() was called and the transfer is not final; its handle is updated as bytes land;
- early: bytes arrived before expect() (prefetch); kept so a later expect() sees them at once;
- finished: SUCCESS or FAILED; kept as a tombstone so late bytes for it are dropped.

Early and finished entries are bounded (time to live and count); active ones live until they are final,
which the owner ensures with a deadline and abort().
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.dataplane.base import Region, TransferHandle, TransferState

log = logging.getLogger("epd.dataplane")


class IntervalSet:
    """Disjoint, sorted half-open intervals; adding merges overlapping and touching ones."""

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start, end = min(start, self._starts[i]), max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def covers(self, start: int, end: int) -> bool:
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def __len__(self) -> int:
        return len(self._starts)


class _Pending:
    """Expected regions not yet covered, per buffer and sorted by offset.

    Only regions overlapping newly written bytes can become covered, and those start in
    (start - longest region, end): a delivery checks just them, so a transfer of many thousand KV
    blocks written one by one stays linear.
    """

    __slots__ = ("_offsets", "_regions", "_longest")

    def __init__(self, regions: Sequence[Region]) -> None:
        self._offsets: dict[str, list[int]] = {}
        self._regions: dict[str, list[Region]] = {}
        self._longest: dict[str, int] = {}
        for region in sorted(regions, key=lambda r: (r.buffer_id, r.offset)):
            self._offsets.setdefault(region.buffer_id, []).append(region.offset)
            self._regions.setdefault(region.buffer_id, []).append(region)
            self._longest[region.buffer_id] = max(self._longest.get(region.buffer_id, 0), region.length)

    def __len__(self) -> int:
        return sum(len(r) for r in self._regions.values())

    def settle(self, buffer_id: str, start: int, end: int, covered: Callable[[Region], bool]) -> None:
        """Drop the regions of `buffer_id` near [start, end) that are now covered."""
        offsets = self._offsets.get(buffer_id)
        if not offsets:
            return
        regions = self._regions[buffer_id]
        lo = bisect.bisect_right(offsets, start - self._longest[buffer_id])
        hi = bisect.bisect_left(offsets, end)
        done = [i for i in range(lo, hi) if covered(regions[i])]
        for i in reversed(done):
            del offsets[i], regions[i]

    def settle_all(self, covered: Callable[[Region], bool]) -> None:
        for buffer_id, regions in self._regions.items():
            keep = [i for i, r in enumerate(regions) if not covered(r)]
            self._regions[buffer_id] = [regions[i] for i in keep]
            self._offsets[buffer_id] = [self._offsets[buffer_id][i] for i in keep]


@dataclass
class _Entry:
    written: dict[str, IntervalSet] = field(default_factory=dict)
    handle: TransferHandle | None = None
    pending: _Pending = field(default_factory=lambda: _Pending(()))
    nbytes: int = 0
    first: float | None = None
    last: float | None = None
    failure: str | None = None
    finished: bool = False
    touched: float = 0.0

    def covered(self, region: Region) -> bool:
        intervals = self.written.get(region.buffer_id)
        return region.length == 0 or (intervals is not None and intervals.covers(region.offset, region.end))


class Ledger:
    """Thread-safe: the receiving thread records bytes while the compute thread expects and aborts."""

    def __init__(
        self,
        *,
        ttl: float = 60.0,
        max_remembered: int = 10_000,
        on_success: Callable[[TransferHandle], None] | None = None,
        on_abort: Callable[[str], None] | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_remembered = max_remembered
        self._on_success = on_success
        self._on_abort = on_abort
        self._active: dict[str, _Entry] = {}
        self._remembered: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def expect(self, transfer_id: str, regions: Sequence[Region]) -> TransferHandle:
        handle = TransferHandle(transfer_id, on_abort=self._aborted)
        with self._lock:
            if transfer_id in self._active:
                raise ValueError(f"transfer {transfer_id!r} is already expected")
            entry = self._remembered.pop(transfer_id, None) or _Entry()
            if entry.finished and entry.failure is None:
                self._remember(transfer_id, entry)
                raise ValueError(f"transfer {transfer_id!r} already completed; transfer ids are single-use")
            entry.handle = handle
            if entry.nbytes:
                handle.add_bytes(entry.nbytes, entry.first, entry.last)
            if entry.failure is not None:
                handle.fail(entry.failure)
                self._remember(transfer_id, entry)
                return handle
            entry.pending = _Pending(regions)
            entry.pending.settle_all(entry.covered)
            self._active[transfer_id] = entry
            self._maybe_complete(transfer_id, entry)
        return handle

    def deliver(
        self,
        transfer_id: str,
        buffer_id: str,
        start: int,
        end: int,
        copy: Callable[[], None] | None = None,
        began: float | None = None,
    ) -> bool:
        """Record bytes [start, end) of a buffer for a transfer; False (and nothing copied) if dropped.

        `copy` (when the bytes still have to be copied into place) runs under the lock, so once abort()
        has returned no byte of that transfer lands any more. `began` is when the bytes started moving
        (monotonic clock; default now).
        """
        began = time.monotonic() if began is None else began
        with self._lock:
            entry = self._active.get(transfer_id)
            if entry is None:
                entry = self._remembered.get(transfer_id)
                if entry is not None and entry.finished:
                    log.info("dropping %d bytes for finished transfer %s", end - start, transfer_id)
                    return False
                if entry is None:
                    entry = self._remember(transfer_id, _Entry())
                else:
                    self._remembered.move_to_end(transfer_id)
            if copy is not None:
                copy()
            now = time.monotonic()
            entry.written.setdefault(buffer_id, IntervalSet()).add(start, end)
            entry.nbytes += end - start
            entry.first = began if entry.first is None else entry.first
            entry.last = entry.touched = now
            if entry.handle is not None:
                entry.handle.add_bytes(end - start, began, now)
                entry.pending.settle(buffer_id, start, end, entry.covered)
                self._maybe_complete(transfer_id, entry)
            return True

    def admits(self, transfer_id: str) -> bool:
        """Whether bytes for the transfer would be kept now (False once it is finished)."""
        with self._lock:
            entry = self._remembered.get(transfer_id)
            return entry is None or not entry.finished

    def fail(self, transfer_id: str, reason: str) -> None:
        """Mark a transfer FAILED (producer cancel, bad bytes); later bytes for it are dropped."""
        with self._lock:
            entry = self._active.pop(transfer_id, None) or self._remembered.pop(transfer_id, None) or _Entry()
            if entry.finished:
                self._remember(transfer_id, entry)
                return
            entry.failure, entry.finished = reason, True
            if entry.handle is not None:
                entry.handle.fail(reason)
            self._remember(transfer_id, entry)

    def state(self, transfer_id: str) -> TransferState | None:
        """For tests and diagnostics: the state of an expected or remembered transfer."""
        with self._lock:
            entry = self._active.get(transfer_id) or self._remembered.get(transfer_id)
        if entry is None:
            return None
        if entry.handle is not None:
            return entry.handle.poll()
        if entry.finished:
            return TransferState.FAILED if entry.failure else TransferState.SUCCESS
        return TransferState.TRANSFERRING

    def __len__(self) -> int:
        return len(self._active) + len(self._remembered)

    def _aborted(self, handle: TransferHandle) -> None:
        with self._lock:
            entry = self._active.pop(handle.transfer_id, None)
            if entry is not None:
                entry.failure, entry.finished = handle.failure(), True
                self._remember(handle.transfer_id, entry)
        if self._on_abort is not None:
            self._on_abort(handle.transfer_id)

    def _maybe_complete(self, transfer_id: str, entry: _Entry) -> None:
        if len(entry.pending) or entry.handle is None:
            return
        del self._active[transfer_id]
        entry.finished = True
        entry.written.clear()
        self._remember(transfer_id, entry)
        if entry.handle.succeed() and self._on_success is not None:
            self._on_success(entry.handle)

    def _remember(self, transfer_id: str, entry: _Entry) -> _Entry:
        now = time.monotonic()
        entry.touched = now
        self._remembered[transfer_id] = entry
        self._remembered.move_to_end(transfer_id)
        while self._remembered:
            oldest_id, oldest = next(iter(self._remembered.items()))
            if len(self._remembered) <= self.max_remembered and oldest.touched >= now - self.ttl:
                break
            del self._remembered[oldest_id]
            if not oldest.finished:
                log.info("forgetting %d early bytes of transfer %s never expected", oldest.nbytes, oldest_id)
        return entry
