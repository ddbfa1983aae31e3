"""shm: producer and consumer on one host; the producer copies straight into the consumer's memory.

The consumer's allocate() creates a POSIX shared-memory segment named from (plane id, buffer id); a
producer derives the same name from the descriptor, maps the segment once (mappings are cached per
buffer), and copies each region in place (memcpy, in `chunk_bytes` pieces so abort() and the consumer's
abort board are checked between them). Then it sends one small "done" notification per region on the
ZeroMQ channel, which is how the consumer's handle learns the bytes are there.

Only memory this plane allocated can be a destination: register() of foreign memory is refused, since
a process other than its owner cannot map it. Segments are unlinked on free(), close() and at exit (and
by the resource tracker if the process dies).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
import weakref
from typing import Any

import msgspec
import numpy as np
import zmq

from common.dataplane import shm_segments as seg
from common.dataplane import wire
from common.dataplane.base import Region
from common.dataplane.channel import ChannelDataPlane
from common.dataplane.sender import Aborted, Job, PeerSender

log = logging.getLogger("epd.dataplane")


class ShmDataPlane(ChannelDataPlane):
    backend = "shm"
    abort_fence_s = 2.0  # the producer checks the abort board between chunks: the one in flight still lands

    def __init__(self, *, chunk_bytes: int = 16 << 20, **options: Any) -> None:
        super().__init__(**options)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.chunk_bytes = chunk_bytes
        self._segments: dict[str, seg.SharedMemory] = {}
        self._board = seg.AbortBoard.create(seg.segment_name(self.id, "#abort-board"))
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- consumer side --------------------------------------------------------------------------------

    def allocate(self, buffer_id: str, nbytes: int) -> memoryview:
        if nbytes <= 0:
            raise ValueError(f"shared memory buffers need a positive size, got {nbytes}")
        if buffer_id in self._segments:
            raise ValueError(f"buffer {buffer_id!r} is already registered; free() it first")
        shm = seg.create(seg.segment_name(self.id, buffer_id), nbytes)
        view = shm.buf[seg.HEADER_BYTES : seg.HEADER_BYTES + nbytes]
        self._segments[buffer_id] = shm
        self.buffers.add(buffer_id, view)
        return view

    def register(self, buffer_id: str, buffer: Any) -> None:
        raise TypeError(
            "ShmDataPlane cannot adopt existing memory: a producer process could not map it. "
            "Use allocate() to get shared memory and build your arrays or tensors on top of it."
        )

    def free(self, buffer_id: str) -> None:
        view = self.buffers.remove(buffer_id)
        shm = self._segments.pop(buffer_id, None)
        if shm is None:
            return
        seg.mark_freed(shm)
        if view is not None:
            with contextlib.suppress(BufferError):
                view.release()
        seg.destroy(shm)

    def consumer_aborted(self, transfer_id: str) -> None:
        self._board.post(transfer_id)

    def on_message(self, header: wire.Header, payload: list[zmq.Frame]) -> None:
        if header.kind != "done" or len(payload) > 1:
            self.reject(
                header, f"shm consumer does not take {header.kind!r} messages with {len(payload)} frames"
            )
            return
        # one notice may cover many regions of one buffer (a layer's KV blocks): frame 1 lists them
        spans = [(header.offset, header.length)]
        if payload:
            try:
                spans = spans_decoder.decode(payload[0].buffer)
            except msgspec.DecodeError as exc:
                self.reject(header, f"malformed region list: {exc}")
                return
        began = min(header.started, time.monotonic()) if header.started > 0 else None
        for offset, length in spans:
            region = Region(header.buffer_id, offset, length)
            if (problem := self.buffers.problem(region)) is not None:
                self.reject(header, problem)
                return
            if self.ledger.deliver(
                header.transfer_id, header.buffer_id, offset, offset + length, began=began
            ):
                self.count_received(length)

    # -- producer side --------------------------------------------------------------------------------

    def send_job(self, sender: PeerSender, job: Job) -> None:
        handle = job.handle
        board = self._abort_board(sender)
        written: dict[str, list[tuple[int, int]]] = {}
        job_started = time.monotonic()
        for view, region in job.items:
            if region.length == 0:
                continue
            dest = self._attachment(sender, region.buffer_id).data
            if region.end > dest.nbytes:
                raise ValueError(
                    f"region [{region.offset}, {region.end}) lies outside buffer {region.buffer_id!r} "
                    f"of {dest.nbytes} bytes"
                )
            source = np.frombuffer(view, dtype=np.uint8)
            region_started = time.monotonic()
            for start in range(0, region.length, self.chunk_bytes):
                sender.check(handle)
                if board.posted(handle.transfer_id):
                    raise Aborted("aborted by the consumer")
                end = min(start + self.chunk_bytes, region.length)
                began = job.started if start == 0 else None
                np.copyto(dest[region.offset + start : region.offset + end], source[start:end])
                handle.add_bytes(end - start, began)
            if region.length >= self.chunk_bytes:  # a big region: tell at once, the next one takes a while
                header = wire.Header(
                    handle.transfer_id, region.buffer_id, region.offset, region.length, "done",
                    started=region_started,
                )  # fmt: skip
                sender.send([wire.encode(header)], handle)
            else:  # small regions (KV blocks): one notice per buffer for the whole write
                written.setdefault(region.buffer_id, []).append((region.offset, region.length))
        for buffer_id, spans in written.items():
            header = wire.Header(
                handle.transfer_id, buffer_id, spans[0][0], spans[0][1], "done", started=job_started
            )
            sender.send([wire.encode(header), spans_encoder.encode(spans)], handle)

    @staticmethod
    def _abort_board(sender: PeerSender) -> seg.AbortBoard:
        """The consumer's abort board, attached on the first write to it."""
        board = sender.state.get("board")
        if board is None:
            board = sender.state["board"] = seg.AbortBoard.attach(
                seg.segment_name(sender.peer["id"], "#abort-board")
            )
        return board

    def _attachment(self, sender: PeerSender, buffer_id: str) -> seg.Attachment:
        cache: dict[str, seg.Attachment] = sender.state.setdefault("attachments", {})
        att = cache.get(buffer_id)
        if att is not None and not att.live:
            att.close()
            att = None
        if att is None:
            name = seg.segment_name(sender.peer["id"], buffer_id)
            try:
                att = cache[buffer_id] = seg.Attachment(name)
            except FileNotFoundError:
                cache.pop(buffer_id, None)
                raise ValueError(
                    f"peer has no buffer {buffer_id!r} (no shared memory segment {name})"
                ) from None
        return att

    def release_peer(self, sender: PeerSender) -> None:
        for att in sender.state.pop("attachments", {}).values():
            att.close()
        board = sender.state.pop("board", None)
        if board is not None:
            board.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        super().close()
        for buffer_id in list(self._segments):
            self.free(buffer_id)
        self._board.close()


spans_encoder = msgspec.msgpack.Encoder()
spans_decoder = msgspec.msgpack.Decoder(list[tuple[int, int]])


def _close_at_exit(ref: weakref.ref[ShmDataPlane]) -> None:
    plane = ref()
    if plane is not None:
        plane.close()
