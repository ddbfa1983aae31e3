"""What the shm, tcp and torchdist backends share: the ZeroMQ channel and the consumer's bookkeeping.

Consumer: one PULL socket bound at construction (its endpoint is in the descriptor) and one receiving
thread that decodes each message's header and hands it to the backend; the compute thread only touches
the `Ledger` (expect, poll, abort), never a socket. Malformed messages are logged and dropped.

Producer: one `PeerSender` (sender.py) per consumer. Backends implement `send_job` (producer, on the
sender's thread) and `on_message` (consumer, on the receiving thread).

With the stack's keys every socket of the plane runs CURVE (common/stack_keys.py): the consumer's
sockets admit only members, and producers connect only to members.
"""

from __future__ import annotations

import abc
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

from common.dataplane import wire
from common.dataplane.base import DataPlane, Region, Source, TransferHandle
from common.dataplane.ledger import Ledger
from common.dataplane.memory import BufferTable, HostBuffers, byte_view
from common.dataplane.sender import POLL_MS, Job, PeerSender
from common.stack_keys import StackKeys, guard

log = logging.getLogger("epd.dataplane")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


HOST_IDENTITY = {"hostname": socket.gethostname(), "boot_id": _boot_id()}


class ChannelDataPlane(HostBuffers, DataPlane):
    """Base of the socket-backed planes; subclasses implement `send_job` and `on_message`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        hwm: int = 16,
        ttl: float = 60.0,
        max_remembered: int = 10_000,
        io_threads: int = 1,
        keys: StackKeys | None = None,
    ) -> None:
        super().__init__()
        self.hwm = hwm
        self.context = zmq.Context(io_threads=io_threads)
        self.keys = keys
        self._guard = guard(self.context, keys)
        self.buffers = BufferTable()
        self.ledger = Ledger(
            ttl=ttl, max_remembered=max_remembered, on_success=self._received, on_abort=self.consumer_aborted
        )
        self._pull = self.context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.RCVHWM, hwm)
        self.serve(self._pull)
        self._pull.bind(f"tcp://{host}:*")
        endpoint = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        if advertise_host:
            endpoint = f"tcp://{advertise_host}:{endpoint.rsplit(':', 1)[1]}"
        self.endpoint = endpoint
        self._senders: dict[str, PeerSender] = {}
        self._senders_lock = threading.Lock()
        self._closed = threading.Event()
        self._receiver = threading.Thread(target=self._receive_loop, name="epd-dataplane-recv", daemon=True)
        self._receiver.start()

    def serve(self, sock: zmq.Socket) -> None:
        """Secure a socket this plane binds (before bind); a no-op without keys."""
        if self.keys is not None:
            self.keys.serve(sock)

    def secure_client(self, sock: zmq.Socket) -> None:
        """Secure a socket this plane connects to a peer (before connect); a no-op without keys."""
        if self.keys is not None:
            self.keys.connect(sock)

    def descriptor(self) -> dict[str, Any]:
        return {"backend": self.backend, "id": self.id, "endpoint": self.endpoint, **HOST_IDENTITY}

    # -- consumer side --------------------------------------------------------------------------------

    def expect(self, transfer_id: str, regions: Sequence[Region]) -> TransferHandle:
        for region in regions:
            if (problem := self.buffers.problem(region)) is not None:
                raise ValueError(f"transfer {transfer_id!r}: {problem}")
        return self.ledger.expect(transfer_id, regions)

    def consumer_aborted(self, transfer_id: str) -> None:
        """Hook: the consumer aborted a transfer (shm tells its producers)."""

    @abc.abstractmethod
    def on_message(self, header: wire.Header, payload: list[zmq.Frame]) -> None:
        """Handle one non-cancel message on the receiving thread."""

    def reject(self, header: wire.Header, reason: str) -> None:
        """Drop a message with a log line; its transfer fails, since bytes of it are lost."""
        log.warning("dropping %s message for transfer %s: %s", header.kind, header.transfer_id, reason)
        self.ledger.fail(header.transfer_id, reason)

    def _received(self, handle: TransferHandle) -> None:
        self.count_received(seconds=handle.seconds)

    def _receive_loop(self) -> None:
        while not self._closed.is_set():
            try:
                if not self._pull.poll(POLL_MS):
                    continue
                while True:
                    frames = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    self._dispatch(frames)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._closed.is_set():
                    return
                log.exception("data plane receive failed")
                self._closed.wait(POLL_MS / 1000)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        try:
            header = wire.decode(frames[0].buffer)
        except msgspec.DecodeError as exc:
            log.warning("dropping malformed data-plane message (%d frames): %s", len(frames), exc)
            return
        try:
            if header.kind == "cancel":
                log.info("producer cancelled transfer %s: %s", header.transfer_id, header.reason)
                self.ledger.fail(header.transfer_id, header.reason or "cancelled by producer")
            else:
                self.on_message(header, frames[1:])
        except Exception:
            log.exception("error handling %s message for transfer %s", header.kind, header.transfer_id)

    # -- producer side --------------------------------------------------------------------------------

    def write(
        self, peer: dict[str, Any], transfer_id: str, items: Sequence[tuple[Source, Region]]
    ) -> TransferHandle:
        if self._closed.is_set():
            raise RuntimeError("data plane is closed")
        if peer.get("backend") != self.backend:
            raise ValueError(f"peer speaks {peer.get('backend')!r}, this plane is {self.backend!r}")
        if not isinstance(peer.get("id"), str) or not isinstance(peer.get("endpoint"), str):
            raise ValueError("peer descriptor lacks an id or an endpoint")
        job_items, total = [], 0
        for source, region in items:
            view = self.source(source)
            if view.nbytes != region.length:
                raise ValueError(
                    f"transfer {transfer_id!r}: source of {view.nbytes} bytes for region of {region.length}"
                )
            if region.offset < 0:
                raise ValueError(f"transfer {transfer_id!r}: negative offset in {region}")
            job_items.append((view, region))
            total += region.length
        handle = TransferHandle(transfer_id)
        self._sender(peer).submit(Job(handle, job_items, total))
        return handle

    def source(self, obj: Source) -> Any:
        """The form in which a backend reads a source; a flat byte memoryview by default."""
        return byte_view(obj)

    @abc.abstractmethod
    def send_job(self, sender: PeerSender, job: Job) -> None:
        """Move a job's bytes on the sender thread; raise Aborted or any error to fail it."""

    def release_peer(self, sender: PeerSender) -> None:
        """Hook: the sender for a peer is shutting down; drop backend state kept for it."""

    def _sender(self, peer: dict[str, Any]) -> PeerSender:
        with self._senders_lock:
            sender = self._senders.get(peer["id"])
            if sender is None:
                sender = self._senders[peer["id"]] = PeerSender(self, peer)
            return sender

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._senders_lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            sender.stop()
        self._receiver.join(timeout=5)
        self._pull.close(linger=0)
        if self._guard is not None:
            self._guard.release()
        self.context.destroy(linger=0)
