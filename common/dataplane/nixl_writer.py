"""The nixl producer: one write() as NIXL WRITEs, on the sender thread of its consumer (sender.py).

A job: ask the consumer for a grant (buffer addresses, its agent's metadata; nixl_grants.py) -> cut
the items into batches of at most `chunk_bytes` -> post each batch as one NIXL transfer of many
descriptors, at most `window` in flight -> when NIXL reports a batch DONE (the UCX endpoint has been
flushed, so the bytes are in the consumer's memory), tell the consumer which regions it filled
(`Done` on the ZeroMQ channel) -> a final `Done` closes the grant. The grant is renewed before each
further batch; the request leaves as the previous batch is posted, so its answer comes back while
that batch moves (over CMA the post itself copies the bytes). A refusal (the consumer aborted) stops
the write: at most `window` + 1 batches land after the consumer's abort().

NIXL reads only registered memory on this side too. Where sources come from decides what we do:

- KV block runs (views of the prefill KV pool) and encoder features are large and writable: each is
  registered with the agent for the job and read in place, and deregistered when the job ends, while
  the job still holds the source (so no registration outlives its memory). With UCX over shared memory
  or TCP that costs about 3 us whatever the size; on RDMA UCX's registration cache serves memory it
  registered before, such as the long-lived KV pool;
- sources under `stage_below` bytes (single small blocks) or read-only ones (bytes) are copied into a
  staging area registered once per consumer link (`window` slots of `stage_bytes`), many per batch.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from common.dataplane import nixl_grants as g
from common.dataplane import wire
from common.dataplane.base import Region, TransferHandle
from common.dataplane.sender import POLL_MS, Aborted, Job, PeerSender

if TYPE_CHECKING:
    from common.dataplane.nixl import NixlDataPlane

MAX_DESCS = 1024  # descriptors per NIXL transfer (and spans per Done message)


def address_of(view: memoryview) -> int:
    """The address of a flat byte view's first byte (read-only views too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


@dataclass(slots=True)
class _Piece:
    source: memoryview | None  # bytes to stage; None when read in place from `address`
    address: int
    remote: int
    span: g.Span


@dataclass
class _Batch:
    pieces: list[_Piece] = field(default_factory=list)
    nbytes: int = 0
    staged: int = 0


class Link:
    """This producer's side of one consumer: its DEALER socket, the loaded metadata, a staging area."""

    def __init__(self, plane: NixlDataPlane, sender: PeerSender) -> None:
        self.plane = plane
        self.sender = sender
        self.socket = plane.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        plane.secure_client(self.socket)
        self.socket.connect(sender.peer["grants"])
        self.seq = 0
        self.md_version = -1
        self.agent_name: str | None = None
        self.staging: np.ndarray | None = None
        self._staging_registration: Any = None
        self.stuck = False  # a transfer from the staging area never finished: keep the area

    def ask(self, handle: TransferHandle, spans: list[g.Span], grant: int = 0) -> int:
        """Send an Ask; returns its sequence number (the reply is read by `reply`)."""
        self.seq += 1
        ask = g.Ask(self.seq, handle.transfer_id, spans, grant, self.md_version)
        frame = g.ask_encoder.encode(ask)
        while True:
            self.sender.check(handle)
            try:
                self.socket.send(frame, flags=zmq.NOBLOCK)
                return self.seq
            except zmq.Again:
                self.socket.poll(POLL_MS, zmq.POLLOUT)

    def reply(self, handle: TransferHandle, seq: int) -> g.Reply:
        """The consumer's answer to Ask `seq`; raises Aborted, TimeoutError or Refused."""
        deadline = time.monotonic() + self.plane.timeout
        while True:
            self.sender.check(handle)
            if self.socket.poll(POLL_MS):
                try:
                    reply = g.reply_decoder.decode(self.socket.recv(flags=zmq.NOBLOCK))
                except (zmq.Again, ValueError):
                    continue
                if reply.seq != seq:
                    continue  # the answer to an ask given up on earlier
                if not reply.grant:
                    raise g.Refused(reply.reason or "refused")
                if reply.metadata:
                    self.agent_name = self.plane.agent.add_remote_agent(reply.metadata).decode()
                    self.md_version = reply.md_version
                return reply
            if time.monotonic() > deadline:
                raise TimeoutError(f"the consumer did not answer within {self.plane.timeout:g} s")

    def stage_slot(self, slot: int) -> tuple[np.ndarray, int]:
        """Staging slot `slot` (a byte array) and its address; the area is made on first use."""
        size = self.plane.stage_bytes
        if self.staging is None:
            self.staging = np.empty(self.plane.window * size, dtype=np.uint8)
            self._staging_registration = self.plane.pin(
                [(int(self.staging.ctypes.data), self.staging.nbytes)]
            )
        area = self.staging[slot * size : (slot + 1) * size]
        return area, int(area.ctypes.data)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.stuck:
            self.plane.keep_forever(self._staging_registration, self.staging)
        elif self._staging_registration is not None:
            self.plane.unpin(self._staging_registration)
        if self.agent_name is not None:
            with contextlib.suppress(Exception):  # the agent may be closing too
                self.plane.agent.remove_remote_agent(self.agent_name)


def plan(
    items: list[tuple[memoryview, Region]],
    buffers: dict[str, tuple[int, int]],
    chunk_bytes: int,
    stage_below: int,
    stage_bytes: int,
) -> tuple[list[_Batch], list[tuple[int, int]]]:
    """Cut a job into batches; also returns the (address, size) of the sources read in place."""
    batches, in_place = [_Batch()], []
    for view, region in items:
        if region.length == 0:
            continue
        remote = buffers[region.buffer_id][0] + region.offset
        staged = view.nbytes < stage_below or view.readonly
        local = 0 if staged else address_of(view)
        if not staged:
            in_place.append((local, view.nbytes))
        step = min(chunk_bytes, stage_bytes) if staged else chunk_bytes
        for start in range(0, region.length, step):
            n = min(step, region.length - start)
            batch = batches[-1]
            if (
                batch.nbytes + n > chunk_bytes
                or (staged and batch.staged + n > stage_bytes)
                or len(batch.pieces) >= MAX_DESCS
            ):
                batches.append(batch := _Batch())
            piece = _Piece(
                view[start : start + n] if staged else None,
                local + start,
                remote + start,
                (region.buffer_id, region.offset + start, n),
            )
            batch.pieces.append(piece)
            batch.nbytes += n
            batch.staged += n if staged else 0
    return [b for b in batches if b.pieces], in_place


class JobWriter:
    """Moves one job: grant, batches through NIXL, reports; run by `NixlDataPlane.send_job`."""

    def __init__(self, plane: NixlDataPlane, link: Link, job: Job) -> None:
        self.plane, self.link, self.job = plane, link, job
        self.handle = job.handle
        self.grant = 0
        self.unreported: list[g.Span] = []
        self.stuck = False  # a transfer neither finished nor could be cancelled
        self.in_flight: deque[tuple[Any, _Batch]] = deque()

    def run(self) -> None:
        handle, link, plane = self.handle, self.link, self.plane
        spans = [(r.buffer_id, r.offset, r.length) for _, r in self.job.items]
        try:
            reply = link.reply(handle, link.ask(handle, spans))
        except g.Refused as exc:
            raise Aborted(f"refused by the consumer: {exc}") from None
        self.grant = reply.grant
        batches, in_place = plan(
            self.job.items, reply.buffers, plane.chunk_bytes, plane.stage_below, plane.stage_bytes
        )
        registration = None
        try:
            registration = plane.pin(in_place) if in_place else None
            renewal = 0
            for i, batch in enumerate(batches):
                while len(self.in_flight) >= plane.window:
                    self._settle(report=True)
                if renewal:
                    try:
                        link.reply(handle, renewal)
                    except g.Refused as exc:
                        raise Aborted(f"stopped by the consumer: {exc}") from None
                link.sender.check(handle)
                # ask for the next batch now: the answer comes back while this one moves
                renewal = link.ask(handle, [], self.grant) if i + 1 < len(batches) else 0
                self.in_flight.append((self._post(batch, slot=i % plane.window), batch))
            while self.in_flight:
                self._settle(report=len(self.in_flight) > 1)
        finally:
            self._drain()
            if self.stuck:  # NIXL may still read these: keep them registered and alive for good
                plane.keep_forever(registration, self.job.items)
            elif registration is not None:
                plane.unpin(registration)
            self._report(final=True)

    def _post(self, batch: _Batch, slot: int) -> Any:
        agent = self.plane.agent
        if batch.staged:
            area, base = self.link.stage_slot(slot)
            offset = 0
            for piece in batch.pieces:
                if piece.source is not None:
                    n = piece.source.nbytes
                    area[offset : offset + n] = np.frombuffer(piece.source, dtype=np.uint8)
                    piece.address, offset = base + offset, offset + n
        local = np.array([(p.address, p.span[2], 0) for p in batch.pieces], dtype=np.uint64)
        remote = np.array([(p.remote, p.span[2], 0) for p in batch.pieces], dtype=np.uint64)
        xfer = agent.initialize_xfer(
            "WRITE", agent.get_xfer_descs(local, "DRAM"), agent.get_xfer_descs(remote, "DRAM"),
            self.link.agent_name,
        )  # fmt: skip
        if agent.transfer(xfer) == "ERR":
            xfer.release()
            raise RuntimeError("NIXL could not post the transfer")
        return xfer

    def _settle(self, report: bool) -> None:
        """Wait for the oldest batch in flight; count its bytes; tell the consumer if asked to."""
        xfer, batch = self.in_flight.popleft()
        state = self.plane.wait_transfer(xfer)
        if state != "DONE":
            self.stuck = self.link.stuck = self.stuck or state == "STUCK"
            raise RuntimeError(f"NIXL transfer ended {state}")
        self.handle.add_bytes(batch.nbytes, self.job.started)
        self.unreported.extend(p.span for p in batch.pieces)
        if report:
            self._report(final=False)

    def _drain(self) -> None:
        """After an error: let what is in flight finish (its bytes land anyway) before letting go."""
        while self.in_flight:
            xfer, batch = self.in_flight.popleft()
            state = self.plane.wait_transfer(xfer)
            if state == "DONE":
                self.unreported.extend(p.span for p in batch.pieces)
            self.stuck = self.link.stuck = self.stuck or state == "STUCK"

    def _report(self, final: bool) -> None:
        if not self.grant or (not final and not self.unreported):
            return
        header = wire.Header(self.handle.transfer_id, "", 0, 0, "done")
        done = g.Done(self.grant, final, self.unreported)
        self.unreported = []
        with contextlib.suppress(Aborted):  # the plane is closing: the grant expires on the consumer
            self.link.sender.send([wire.encode(header), g.ask_encoder.encode(done)], None)
