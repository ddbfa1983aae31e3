"""mooncake: one-sided writes with the Mooncake Transfer Engine (RDMA where present, TCP elsewhere).

Every plane owns one engine in P2PHANDSHAKE mode (no metadata server: engines exchange segment
descriptions directly), and the descriptor we publish on the control plane carries its session id, the
protocol and the address of its control page (mooncake_page.py), besides the usual ZeroMQ endpoint.

Consumer: allocate()/register() register the destination memory with the engine and list it in the
control page; free() unlists and unregisters it and keeps the memory alive a little longer
(`retire_s`), so a write already accepted by the engine never lands in released pages. abort() posts
the transfer on the page's abort board.

Producer, on the sender thread for that consumer: read the consumer's page (one Mooncake read) to find
each region's buffer and check nobody aborted, then move the bytes in batches of up to `chunk_bytes`
with `batch_transfer_sync_write` straight from the source when its memory is registered (see
mooncake_sources.py: KV pools and encoder outputs are pinned whole) or through a registered staging
buffer otherwise. After each batch a "done" notice per buffer goes over the ZeroMQ channel, carrying the
written spans and the buffer's generation; that notice, not the engine, tells the consumer's ledger that
the bytes are in place. The page is read again before every further batch, so a consumer's abort stops
the producer within one batch; bytes of the batch in flight may still land, as with shm.

Destinations are host memory (the CPU wheel cannot register device memory). `protocol` is "tcp" by
default here and "rdma" on clusters (`device` names the NICs; empty lets Mooncake discover them);
both ends must use the same one. Only this module imports the library, and only once a plane is made
(or `unavailable_reason()` asks), so the package and the other backends never need it.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from typing import Any

import msgspec
import numpy as np
import zmq

from common.dataplane import wire
from common.dataplane.base import Region
from common.dataplane.channel import ChannelDataPlane
from common.dataplane.memory import byte_view
from common.dataplane.mooncake_link import Batch, Link, notice_decoder
from common.dataplane.mooncake_page import PAGE_BYTES, ControlPage
from common.dataplane.mooncake_sources import Registry, address_of
from common.dataplane.sender import Aborted, Job, PeerSender

log = logging.getLogger("epd.dataplane")

PROTOCOLS = ("tcp", "rdma")
_MAX_BATCH = 256  # transfers per engine call


def unavailable_reason() -> str | None:
    """Why the Mooncake library cannot be used here, or None when it imports."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as exc:  # a missing wheel, or a wheel missing its system libraries (libibverbs)
        return (
            f"the Mooncake Transfer Engine does not import ({type(exc).__name__}: {exc}); install "
            "mooncake-transfer-engine-non-cuda (CPU hosts) or mooncake-transfer-engine (CUDA), and libibverbs1"
        )
    return None


def _has_rdma_devices(engine: Any) -> bool:
    """Whether the engine's topology lists any NIC (it maps each CPU or GPU to preferred and other NICs)."""
    try:
        topology = json.loads(engine.get_local_topology())
    except (ValueError, RuntimeError):
        return True  # cannot tell: let the first transfer say
    return any(nic for lists in topology.values() for nics in lists for nic in nics)


class MooncakeDataPlane(ChannelDataPlane):
    backend = "mooncake"
    abort_fence_s = 2.0  # the abort board is read before each batch: the one in flight still lands

    def __init__(
        self,
        *,
        protocol: str = "tcp",
        device: str = "",
        chunk_bytes: int = 16 << 20,
        pin_min_bytes: int = 1 << 20,
        retire_s: float = 5.0,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        **options: Any,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown mooncake protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        if (reason := unavailable_reason()) is not None:
            raise RuntimeError(reason)
        from mooncake.engine import TransferEngine

        self.protocol = protocol
        self.chunk_bytes = chunk_bytes
        self.retire_s = retire_s
        engine_host = advertise_host or (host if host not in ("", "0.0.0.0", "::") else socket.gethostname())
        self.engine = TransferEngine()
        rc = self.engine.initialize(engine_host, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise RuntimeError(f"mooncake engine did not start ({protocol} on {engine_host}, code {rc})")
        if protocol == "rdma" and not device and not _has_rdma_devices(self.engine):
            raise RuntimeError(
                "mooncake found no RDMA devices here; name them with `device` or use protocol 'tcp'"
            )
        self.session = f"{engine_host}:{self.engine.get_rpc_port()}"
        self.registry = Registry(self.engine, pin_min_bytes=pin_min_bytes)
        self.page = ControlPage()
        self.registry.add(self.page.address, PAGE_BYTES)
        self._memory: dict[str, tuple[int, Any]] = {}  # buffer id -> (address, what keeps it alive)
        self._generations: dict[str, int] = {}
        self._retired: collections.deque[tuple[float, Any]] = collections.deque()
        self._memory_lock = threading.Lock()
        super().__init__(host=host, advertise_host=advertise_host, **options)
        log.info("mooncake engine at %s over %s", self.session, protocol)

    def descriptor(self) -> dict[str, Any]:
        return {
            **super().descriptor(),
            "session": self.session,
            "protocol": self.protocol,
            "page": self.page.address,
        }

    # -- consumer side --------------------------------------------------------------------------------

    def allocate(self, buffer_id: str, nbytes: int) -> memoryview:
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        view = memoryview(np.zeros(nbytes, dtype=np.uint8)).cast("B")
        self._adopt(buffer_id, view)
        return view

    def register(self, buffer_id: str, buffer: Any) -> None:
        self._adopt(buffer_id, byte_view(buffer, writable=True))

    def _adopt(self, buffer_id: str, view: memoryview) -> None:
        self.buffers.add(buffer_id, view)  # raises for an id in use
        address, registered = address_of(view), False
        try:
            if view.nbytes:
                self.registry.add(address, view.nbytes)
                registered = True
            generation = self.page.publish(buffer_id, address, view.nbytes)
        except Exception:
            self.buffers.remove(buffer_id)
            if registered:
                self.registry.remove(address)
            raise
        with self._memory_lock:
            self._memory[buffer_id] = (address, view)
            self._generations[buffer_id] = generation
            self._purge_retired()

    def free(self, buffer_id: str) -> None:
        self.page.withdraw(buffer_id)  # producers stop finding it...
        with self._memory_lock:
            held = self._memory.pop(buffer_id, None)
            self._generations.pop(buffer_id, None)
            if held is None:
                return
            address, view = held
            if view.nbytes:
                self.registry.remove(address)  # ...and the engine refuses writes into it...
            self.buffers.remove(buffer_id)
            self._retired.append((time.monotonic() + self.retire_s, view))  # ...while late ones finish
            self._purge_retired()

    def _purge_retired(self) -> None:
        now = time.monotonic()
        while self._retired and self._retired[0][0] <= now:
            self._retired.popleft()

    def consumer_aborted(self, transfer_id: str) -> None:
        self.page.post_abort(transfer_id)

    def on_message(self, header: wire.Header, payload: list[zmq.Frame]) -> None:
        if header.kind != "done" or len(payload) != 1:
            self.reject(
                header, f"mooncake consumer does not take {header.kind!r} messages with {len(payload)} frames"
            )
            return
        try:
            notice = notice_decoder.decode(payload[0].buffer)
        except msgspec.DecodeError as exc:
            self.reject(header, f"malformed notice: {exc}")
            return
        if self._generations.get(header.buffer_id) != notice.generation:
            self.reject(header, f"buffer {header.buffer_id!r} was freed (or allocated again) meanwhile")
            return
        began = min(header.started, time.monotonic()) if header.started > 0 else None
        for offset, length in notice.spans:
            region = Region(header.buffer_id, offset, length)
            if (problem := self.buffers.problem(region)) is not None:
                self.reject(header, problem)
                return
            if self.ledger.deliver(header.transfer_id, header.buffer_id, offset, region.end, began=began):
                self.count_received(length)

    # -- producer side --------------------------------------------------------------------------------

    def send_job(self, sender: PeerSender, job: Job) -> None:
        link = self._link(sender)
        handle = job.handle
        page = link.read_page()
        if page.aborted(handle.transfer_id):
            raise Aborted("aborted by the consumer")
        batch = Batch(link, handle, job.started)
        for view, region in job.items:
            entry = page.lookup(region.buffer_id)
            if entry is None:
                raise ValueError(f"peer has no buffer {region.buffer_id!r}")
            if region.end > entry.nbytes:
                raise ValueError(
                    f"region [{region.offset}, {region.end}) lies outside buffer {region.buffer_id!r} "
                    f"of {entry.nbytes} bytes"
                )
            in_place = self.registry.locate(view)
            for start in range(0, region.length, self.chunk_bytes):
                n = min(self.chunk_bytes, region.length - start)
                if in_place is None and batch.staged + n > link.staging_bytes:
                    batch.flush()
                source = in_place + start if in_place is not None else batch.stage(view[start : start + n])
                batch.add(source, entry, region.buffer_id, region.offset + start, n)
                if batch.nbytes >= self.chunk_bytes or len(batch.lengths) >= _MAX_BATCH:
                    batch.flush()
        batch.flush()

    def _link(self, sender: PeerSender) -> Link:
        link = sender.state.get("link")
        if link is None:
            peer = sender.peer
            if peer.get("protocol") != self.protocol:
                raise ValueError(
                    f"peer speaks mooncake over {peer.get('protocol')!r}, this plane {self.protocol!r}"
                )
            if not isinstance(peer.get("session"), str) or not isinstance(peer.get("page"), int):
                raise ValueError("peer descriptor lacks a mooncake session or control page")
            link = sender.state["link"] = Link(self, sender)
        return link

    def release_peer(self, sender: PeerSender) -> None:
        link = sender.state.pop("link", None)
        if link is not None:
            link.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        super().close()  # senders and the receiver stop first: nothing uses the engine from here on
        self.registry.close()
        self.engine = self.registry.engine = None  # the engine stops its threads before the memory goes
        with self._memory_lock:
            self._memory.clear()
            self._retired.clear()
