"""The mooncake producer's side of one consumer: its session, registered scratch, and batches of writes.

A `Link` lives in the consumer's PeerSender (one sender thread per consumer, so nothing here is shared
between threads): it reads the consumer's control page into a registered copy, and owns the staging
buffer for sources that cannot be read in place. A `Batch` gathers up to one chunk of (source, dest,
length) transfers for one `batch_transfer_sync_write` call and then sends the "done" notices for them
over the ZeroMQ channel: one per buffer, with the spans written and the generation of the buffer the
producer found in the page, which the consumer checks before its ledger counts the bytes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from common.dataplane import wire
from common.dataplane.mooncake_page import PAGE_BYTES, PAGE_WORDS, PageSnapshot
from common.dataplane.sender import Aborted, PeerSender

if TYPE_CHECKING:
    from common.dataplane.mooncake import MooncakeDataPlane

_PAGE_READS = 5  # attempts at a page that is not torn


class Notice(msgspec.Struct, array_like=True):
    """Frame 1 of a "done" message: the buffer's generation and the (offset, length) spans written."""

    generation: int
    spans: list[tuple[int, int]]


notice_encoder = msgspec.msgpack.Encoder()
notice_decoder = msgspec.msgpack.Decoder(Notice)


class Link:
    """A producer's state for one consumer: the session, and registered scratch (page copy, staging)."""

    def __init__(self, plane: MooncakeDataPlane, sender: PeerSender) -> None:
        self.plane = plane
        self.sender = sender
        self.session: str = sender.peer["session"]
        self.page_address: int = sender.peer["page"]
        self.page = np.zeros(PAGE_WORDS, dtype=np.uint64)
        plane.registry.add(int(self.page.ctypes.data), PAGE_BYTES)
        self.staging_bytes = plane.chunk_bytes
        self._staging: np.ndarray | None = None

    @property
    def staging(self) -> np.ndarray:
        if self._staging is None:  # only for sources that cannot be read in place
            self._staging = np.empty(self.staging_bytes, dtype=np.uint8)
            self.plane.registry.add(int(self._staging.ctypes.data), self.staging_bytes)
        return self._staging

    def read_page(self) -> PageSnapshot:
        engine = self.plane.engine
        for _ in range(_PAGE_READS):
            rc = engine.transfer_sync_read(
                self.session, int(self.page.ctypes.data), self.page_address, PAGE_BYTES
            )
            if rc != 0:
                raise RuntimeError(
                    f"cannot reach the consumer's mooncake engine at {self.session} (code {rc})"
                )
            snapshot = PageSnapshot(self.page.copy())
            if not snapshot.torn():
                return snapshot
        raise RuntimeError("the consumer's control page kept changing while it was read")

    def write(self, sources: list[int], dests: list[int], lengths: list[int]) -> None:
        rc = self.plane.engine.batch_transfer_sync_write(self.session, sources, dests, lengths)
        if rc != 0:
            raise RuntimeError(f"mooncake write of {sum(lengths)} bytes to {self.session} failed (code {rc})")

    def close(self) -> None:
        for memory in (self.page, self._staging):
            if memory is not None:
                self.plane.registry.remove(int(memory.ctypes.data))


class Batch:
    """The transfers of one engine call, and the notices that tell the consumer once they are in."""

    def __init__(self, link: Link, handle: Any, started: float) -> None:
        self.link, self.handle, self.started = link, handle, started
        self.flushed = 0
        self._reset()

    def _reset(self) -> None:
        self.sources: list[int] = []
        self.dests: list[int] = []
        self.lengths: list[int] = []
        self.spans: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        self.nbytes = self.staged = 0

    def stage(self, piece: memoryview) -> int:
        """Copy a piece of a source into the staging buffer; its address there."""
        staging = self.link.staging
        np.copyto(staging[self.staged : self.staged + piece.nbytes], np.frombuffer(piece, dtype=np.uint8))
        address = int(staging.ctypes.data) + self.staged
        self.staged += piece.nbytes
        return address

    def add(self, source: int, entry: Any, buffer_id: str, offset: int, nbytes: int) -> None:
        self.sources.append(source)
        self.dests.append(entry.address + offset)
        self.lengths.append(nbytes)
        self.nbytes += nbytes
        _, spans = self.spans.setdefault(buffer_id, (entry.generation, []))
        if spans and spans[-1][0] + spans[-1][1] == offset:
            spans[-1] = (spans[-1][0], spans[-1][1] + nbytes)
        else:
            spans.append((offset, nbytes))

    def flush(self) -> None:
        if not self.lengths:
            return
        sender, tid = self.link.sender, self.handle.transfer_id
        sender.check(self.handle)
        if self.flushed and self.link.read_page().aborted(tid):  # the first batch used send_job's read
            raise Aborted("aborted by the consumer")
        began = time.monotonic() if self.flushed else self.started
        self.link.write(self.sources, self.dests, self.lengths)
        self.handle.add_bytes(self.nbytes, self.started)
        for buffer_id, (generation, spans) in self.spans.items():
            header = wire.Header(tid, buffer_id, spans[0][0], spans[0][1], "done", started=began)
            sender.send([wire.encode(header), notice_encoder.encode(Notice(generation, spans))], self.handle)
        self.flushed += 1
        self._reset()
