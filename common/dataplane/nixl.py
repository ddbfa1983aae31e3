"""nixl: NIXL agents over UCX; the producer writes straight into the consumer's registered memory.

UCX picks the path between the two agents: RDMA across hosts where there is one, shared memory or
CMA on one host, TCP otherwise (`UCX_TLS` narrows the choice, `UCX_NET_DEVICES` the interfaces).

Consumer: allocate()/register() register each buffer with this plane's agent. The descriptor names two
ZeroMQ endpoints and nothing else, so it travels wherever the other backends' descriptors do (JSON
included): the PULL channel (channel.py) for Done reports and cancels, and a ROUTER ("grants")
answered by one desk thread. What a producer needs from NIXL, the agent's metadata (NIXL's own bytes:
UCX worker address and memory keys) and buffer addresses, rides in the answers to its grant requests as
msgpack bytes, so a producer holding a descriptor from start-up reaches buffers allocated since. Never
pickle: NIXL's own `get_serialized_descs` pickles, so buffer descriptors travel as (address, size) pairs.
Why every write is granted first: nixl_grants.py.

Producer: nixl_writer.py, on the sender thread of each consumer (sender.py).

Completion: when NIXL reports a batch DONE on the producer, UCX has flushed the endpoint, so the bytes
are in the consumer's memory; the producer then sends `Done` on the ZeroMQ channel and the consumer's
receiving thread records the regions in its ledger. NIXL notifications would need a thread polling the
agent; the channel wakes the thread that waits on it.

Abort: after the consumer's abort() its grant answers are refusals, so at most the batches in flight
and the one already granted (`window` + 1 batches of `chunk_bytes`) still land; the producer's abort()
takes effect between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import zmq

from common.dataplane import nixl_grants as g
from common.dataplane import wire
from common.dataplane.base import Region, Source, TransferHandle
from common.dataplane.channel import ChannelDataPlane
from common.dataplane.memory import byte_view
from common.dataplane.nixl_library import load_nixl, unavailable_reason
from common.dataplane.nixl_writer import JobWriter, Link, address_of
from common.dataplane.sender import POLL_MS, Job, PeerSender

log = logging.getLogger("epd.dataplane")

__all__ = ["NixlDataPlane", "unavailable_reason"]


class NixlDataPlane(ChannelDataPlane):
    backend = "nixl"
    abort_fence_s = 2.0  # granted batches in flight (the window) still land after abort()

    def __init__(
        self,
        *,
        chunk_bytes: int = 16 << 20,
        window: int = 2,
        stage_below: int = 64 << 10,
        stage_bytes: int = 4 << 20,
        timeout: float = 30.0,
        backends: Sequence[str] = ("UCX",),
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        ttl: float = 60.0,
        **options: Any,
    ) -> None:
        nixl = load_nixl()
        if min(chunk_bytes, window, stage_bytes, timeout) <= 0 or stage_below > stage_bytes:
            raise ValueError(
                "chunk_bytes, window, stage_bytes, timeout must be positive, stage_below <= stage_bytes"
            )
        self.chunk_bytes, self.window, self.timeout = chunk_bytes, window, timeout
        self.stage_below, self.stage_bytes = stage_below, stage_bytes
        self.book = g.GrantBook(ttl=ttl)
        super().__init__(host=host, advertise_host=advertise_host, ttl=ttl, **options)
        try:
            config = nixl.nixl_agent_config(
                backends=list(backends), sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
            )  # one agent serves the desk, the receiver, every sender and the caller's threads
            self.agent = nixl.nixl_agent(self.id, config)
        except Exception:
            super().close()
            raise
        self._metadata: tuple[int, bytes] = (-1, b"")
        self._kept: list[Any] = []
        self._router = self.context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self.serve(self._router)
        self._router.bind(f"tcp://{host}:*")
        endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        if advertise_host:
            endpoint = f"tcp://{advertise_host}:{endpoint.rsplit(':', 1)[1]}"
        self.grants_endpoint = endpoint
        self._desk_stop = threading.Event()
        self._desk = threading.Thread(target=self._desk_loop, name="epd-dataplane-grants", daemon=True)
        self._desk.start()

    def descriptor(self) -> dict[str, Any]:
        return {**super().descriptor(), "grants": self.grants_endpoint}

    # -- registration with the agent ------------------------------------------------------------------

    def pin(self, spans: list[tuple[int, int]]) -> Any:
        """Register host memory [(address, size)] with the agent; returns what `unpin` takes."""
        return self.agent.register_memory([(a, n, 0, "") for a, n in spans], "DRAM")

    def unpin(self, registration: Any) -> None:
        if registration is not None:
            self.agent.deregister_memory(registration)

    def keep_forever(self, *things: Any) -> None:
        """Memory a transfer that never finished may still touch: never released (rare; logged)."""
        log.warning("a NIXL transfer did not finish; keeping its memory registered and alive")
        self._kept.append(things)

    # -- consumer side --------------------------------------------------------------------------------

    def allocate(self, buffer_id: str, nbytes: int) -> memoryview:
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        view = memoryview(np.zeros(nbytes, dtype=np.uint8))
        self._adopt(buffer_id, view)
        return view

    def register(self, buffer_id: str, buffer: Any) -> None:
        self._adopt(buffer_id, byte_view(buffer, writable=True))

    def _adopt(self, buffer_id: str, view: memoryview) -> None:
        address = address_of(view)
        registration = self.pin([(address, view.nbytes)]) if view.nbytes else None
        try:
            self.book.add(buffer_id, g.Destination(view, address, registration))
        except ValueError:
            self.unpin(registration)
            raise
        self.buffers.add(buffer_id, view)

    def free(self, buffer_id: str) -> None:
        self.buffers.remove(buffer_id)
        for registration in self.book.remove(buffer_id):
            self.unpin(registration)

    def on_message(self, header: wire.Header, payload: list[zmq.Frame]) -> None:
        if header.kind != "done" or len(payload) != 1:
            self.reject(
                header, f"nixl consumer does not take {header.kind!r} messages of {len(payload)} frames"
            )
            return
        try:
            done = g.done_decoder.decode(payload[0].buffer)
        except msgspec.DecodeError as exc:
            self.reject(header, f"malformed report: {exc}")
            return
        for buffer_id, offset, length in done.spans:
            began, problem = self.book.landed(done.grant, header.transfer_id, buffer_id)
            problem = problem or self.buffers.problem(Region(buffer_id, offset, length))
            if problem is not None:
                self.reject(header, problem)
                break
            if self.ledger.deliver(header.transfer_id, buffer_id, offset, offset + length, began=began):
                self.count_received(length)
        if done.final:
            for registration in self.book.close(done.grant):
                self.unpin(registration)

    def _desk_loop(self) -> None:
        """Answer grant requests (the only thread that touches the ROUTER); expire silent grants."""
        next_expiry = time.monotonic() + 1.0
        while not self._desk_stop.is_set():
            try:
                if self._router.poll(POLL_MS):
                    frames = self._router.recv_multipart(flags=zmq.NOBLOCK)
                    if len(frames) != 2:
                        log.warning("dropping a grant request of %d frames", len(frames) - 1)
                    elif (reply := self._answer(frames[1])) is not None:
                        self._router.send_multipart([frames[0], g.ask_encoder.encode(reply)])
                if time.monotonic() > next_expiry:
                    next_expiry = time.monotonic() + 1.0
                    for registration in self.book.expire(time.monotonic()):
                        self.unpin(registration)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._desk_stop.is_set():
                    return
                log.exception("data plane grant desk failed")
                self._desk_stop.wait(POLL_MS / 1000)
            except Exception:
                log.exception("error answering a grant request")

    def _answer(self, frame: bytes) -> g.Reply | None:
        try:
            ask = g.ask_decoder.decode(frame)
        except msgspec.DecodeError as exc:
            log.warning("dropping malformed grant request: %s", exc)
            return None
        now = time.monotonic()
        try:
            if ask.grant:
                self.book.renew(ask.grant, ask.transfer_id, self.ledger.admits, now)
                return g.Reply(ask.seq, ask.grant)
            grant, buffers = self.book.grant(ask.transfer_id, ask.spans, self.ledger.admits, now)
        except g.Refused as exc:
            if exc.fatal:
                log.warning("refusing transfer %s: %s", ask.transfer_id, exc)
                self.ledger.fail(ask.transfer_id, str(exc))
            return g.Reply(ask.seq, reason=str(exc))
        version, metadata = ask.md_version, b""
        if buffers and ask.md_version != self.book.version:
            try:
                version, metadata = self._agent_metadata()
            except Exception as exc:  # NIXL refused: the producer hears why instead of waiting
                log.warning("no agent metadata for transfer %s: %s", ask.transfer_id, exc)
                for registration in self.book.close(grant):
                    self.unpin(registration)
                return g.Reply(ask.seq, reason=f"the consumer has no NIXL metadata: {exc}")
        return g.Reply(ask.seq, grant, "", version, metadata, buffers)

    def _agent_metadata(self) -> tuple[int, bytes]:
        """The agent's connection info and the keys of every live destination, made once per version."""
        version, spans = self.book.snapshot()
        if self._metadata[0] != version:
            registered = [(a, n, 0, "") for a, n in spans if n]  # empty buffers are not registered
            metadata = b""
            if registered:
                descs = self.agent.get_reg_descs(registered, "DRAM")
                metadata = self.agent.get_partial_agent_metadata(descs, True)
            self._metadata = (version, metadata)
        return self._metadata

    # -- producer side --------------------------------------------------------------------------------

    def write(
        self, peer: dict[str, Any], transfer_id: str, items: Sequence[tuple[Source, Region]]
    ) -> TransferHandle:
        if peer.get("backend") == self.backend and not isinstance(peer.get("grants"), str):
            raise ValueError("peer descriptor lacks the grants endpoint")
        return super().write(peer, transfer_id, items)

    def send_job(self, sender: PeerSender, job: Job) -> None:
        link = sender.state.get("link")
        if link is None:
            link = sender.state["link"] = Link(self, sender)
        JobWriter(self, link, job).run()

    def wait_transfer(self, xfer: Any) -> str:
        """Poll a posted transfer to the end: DONE, ERR, or STUCK (past `timeout`, or the plane closed;
        the transfer is then never released, since UCX might still be reading its memory)."""
        deadline = time.monotonic() + self.timeout
        delay = 0.0
        while (state := self.agent.check_xfer_state(xfer)) == "PROC":
            if time.monotonic() > deadline or self._closed.is_set():
                self.keep_forever(xfer)
                return "STUCK"
            time.sleep(delay)
            delay = min(2 * delay or 20e-6, 1e-3)
        xfer.release()
        return state

    def release_peer(self, sender: PeerSender) -> None:
        link = sender.state.pop("link", None)
        if link is not None:
            link.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._desk_stop.set()  # no grant is given or renewed from now on
        self._desk.join(timeout=5)
        self._router.close(linger=0)
        deadline = time.monotonic() + 1.0
        while len(self.book) and time.monotonic() < deadline:  # batches in flight report, or give up
            time.sleep(0.01)
        super().close()
        for registration in self.book.clear():
            self.unpin(registration)
