"""The producer's side of the ZeroMQ channel: one sender thread per consumer.

Each consumer a plane writes to gets a `PeerSender`: a thread, its own PUSH socket (ZeroMQ sockets are
not thread-safe, so only that thread touches it) and a queue of writes. Writes to one consumer therefore
stay in order (torchdist relies on it) while different consumers proceed in parallel. Nothing here blocks
for good: a full socket queue or an unfinished zero-copy send is waited on in short slices, checking the
transfer's handle for abort() and the plane for close() in between.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from common.dataplane import wire
from common.dataplane.base import Region, TransferHandle, TransferState

if TYPE_CHECKING:
    from common.dataplane.channel import ChannelDataPlane

log = logging.getLogger("epd.dataplane")

POLL_MS = 100


class Aborted(Exception):
    """The transfer's handle was aborted (or the plane closed) while its bytes were moving."""


@dataclass
class Job:
    """One write(): its handle, (source, region) pairs in the backend's source form, total bytes."""

    handle: TransferHandle
    items: list[tuple[Any, Region]]
    nbytes: int
    started: float = 0.0


class PeerSender:
    """The producer's link to one consumer: a thread, its PUSH socket and backend state (`state`)."""

    def __init__(self, plane: ChannelDataPlane, peer: dict[str, Any]) -> None:
        self.plane = plane
        self.peer = peer
        self.state: dict[str, Any] = {}
        self.socket: zmq.Socket | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"epd-dataplane-send-{peer['id'][:8]}")
        self._thread.daemon = True
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._closing = True
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def send(self, frames: Sequence[Any], handle: TransferHandle | None, *, track: bool = False) -> Any:
        """Queue one multipart message, zero-copy when tracked; retried while the queue is full."""
        assert self.socket is not None
        while True:
            self.check(handle)
            try:
                return self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=not track, track=track)
            except zmq.Again:
                self.socket.poll(POLL_MS, zmq.POLLOUT)

    def wait_sent(self, tracker: Any, handle: TransferHandle) -> None:
        """Block until ZeroMQ has finished with a tracked message's memory."""
        while not tracker.done:
            self.check(handle)
            with contextlib.suppress(zmq.NotDone):
                tracker.wait(POLL_MS / 1000)

    def check(self, handle: TransferHandle | None) -> None:
        """Raise Aborted if the plane is closing or the transfer was aborted."""
        if self._closing:
            raise Aborted("data plane closed")
        if handle is not None and handle.poll() is TransferState.FAILED:
            raise Aborted(handle.failure() or "aborted")

    def cancel(self, transfer_id: str, reason: str) -> None:
        """Tell the consumer the transfer will not complete (best effort, never blocks)."""
        if self.socket is None:
            return
        header = wire.Header(transfer_id, "", 0, 0, "cancel", reason=reason)
        try:
            self.socket.send(wire.encode(header), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            log.info("could not tell %s that transfer %s was cancelled", self.peer["endpoint"], transfer_id)

    def _run(self) -> None:
        broken = None
        try:
            self.socket = self.plane.context.socket(zmq.PUSH)
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.SNDHWM, self.plane.hwm)
            self.plane.secure_client(self.socket)
            self.socket.connect(self.peer["endpoint"])
        except zmq.ZMQError as exc:
            broken = f"cannot connect to {self.peer['endpoint']!r}: {exc}"
        try:
            while (job := self._jobs.get()) is not None:
                if broken is None:
                    self._run_job(job)
                else:
                    job.handle.fail(broken)
        finally:
            self.plane.release_peer(self)
            if self.socket is not None:
                self.socket.close(linger=0)

    def _run_job(self, job: Job) -> None:
        handle = job.handle
        job.started = time.monotonic()
        try:
            self.check(handle)
            self.plane.send_job(self, job)
        except Aborted as exc:
            handle.fail(str(exc))
            self.cancel(handle.transfer_id, f"producer: {exc}")
            return
        except Exception as exc:  # a backend error fails this transfer, never the sender thread
            log.warning("transfer %s to %s failed: %s", handle.transfer_id, self.peer["endpoint"], exc)
            handle.fail(f"{type(exc).__name__}: {exc}")
            self.cancel(handle.transfer_id, f"producer: {exc}")
            return
        if handle.succeed():
            self.plane.count_sent(job.nbytes, handle.seconds)
