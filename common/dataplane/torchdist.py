"""torchdist: point-to-point send/recv over a torch.distributed process group per producer/consumer pair.

The collective library follows the plane's device: gloo for host memory (`device="cpu"`, the default),
nccl for `cuda` / `cuda:N`, hccl for `npu` (torch_npu, imported only then). Each rank uses its own
process's device; the peer's must be another one (torchdist_pairing refuses two ranks on one GPU).

No global default group: the consumer hosts a `TCPStore`, and each producer that writes to it opens a
two-rank group under its own store prefix (producer rank 1, consumer rank 0). The ZeroMQ channel carries
the coordination: "hello" asks the consumer to join a new group; then each batch of chunks is announced
by one "send" message (frame 0 the first chunk's header, one more frame per further chunk) just before
the producer posts the batch's sends with `dist.batch_isend_irecv`; a per-pair thread on the consumer
posts the same batch of recvs, straight into the destination where it can. Sends and recvs of a pair
use one tag and match by order, which the single PUSH socket and the single sender thread per peer keep.
Each direction between two processes is its own group, so it does not matter which side writes first.

Memory: a source may be host memory (memoryview, bytes, numpy, CPU tensor) or a tensor on the plane's
device; a destination may be host memory or a tensor on the plane's device (`register`). Device to
device there is no host bounce; host memory on an accelerator plane is staged through device memory
(that side only). Batches are waited on by the sender and pair threads, never by the compute thread;
a device source is sent after the kernels queued before `write()` on the caller's stream.

Limits:
- abort() takes effect between batches (`batch_bytes`, `batch_chunks`): an announced batch is always
  sent, since the consumer has posted its recvs; a batch in flight when the consumer aborts still lands;
- a producer that dies mid-batch leaves the consumer's recvs waiting until `timeout`, then that pair is
  dropped (its transfers fail) and the producer's next write opens a new group; with nccl, torch's
  watchdog acts at the same timeout, by default ending the process (TORCH_NCCL_ASYNC_ERROR_HANDLING);
- the channel is trusted: a forged "send" message for a live pair would desynchronise it until timeout.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import msgspec
import torch
import torch.distributed as dist
import zmq

from common.dataplane import wire
from common.dataplane.base import Region
from common.dataplane.channel import ChannelDataPlane
from common.dataplane.memory import byte_view
from common.dataplane.sender import Aborted, Job, PeerSender
from common.dataplane.torchdist_device import (
    Lane,
    identity,
    local_device,
    pair_group,
    post,
    ready_event,
    release_group,
    settle,
)
from common.dataplane.torchdist_pair import Pair
from common.dataplane.torchdist_pairing import DIST_BACKENDS, choose, pairing_problem

__all__ = ["DIST_BACKENDS", "TorchDistDataPlane"]


class _Outgoing:
    """A source as the sender thread reads it: flat bytes, and the event that says they are ready."""

    __slots__ = ("tensor", "ready")

    def __init__(self, tensor: torch.Tensor, ready: Any | None = None) -> None:
        self.tensor, self.ready = tensor, ready

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()


Chunk = tuple[_Outgoing, Region, int, int]  # source, region, offset in the region, length


def _announcement(transfer_id: str, key: str, batch: list[Chunk]) -> list[bytes]:
    """The one "send" message for a batch: a header per chunk, in the order its sends are posted."""
    return [
        wire.encode(wire.Header(transfer_id, r.buffer_id, r.offset, r.length, "send", s, n, sender=key))
        for _, r, s, n in batch
    ]


class TorchDistDataPlane(ChannelDataPlane):
    backend = "torchdist"
    abort_fence_s = 2.0  # an announced batch is always received, after abort() too

    def __init__(
        self,
        *,
        device: str | None = None,
        dist_backend: str | None = None,
        chunk_bytes: int = 32 << 20,
        batch_bytes: int = 128 << 20,
        batch_chunks: int = 64,
        timeout: float = 60.0,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        **options: Any,
    ) -> None:
        spec, self.dist_backend = choose(device, dist_backend)
        self.device = local_device(spec, self.dist_backend)
        self.devices = ("cpu",) if self.device.type == "cpu" else ("cpu", self.device.type)
        self.identity = identity(self.device)
        super().__init__(host=host, advertise_host=advertise_host, **options)
        self.chunk_bytes, self.batch_bytes, self.batch_chunks = chunk_bytes, batch_bytes, batch_chunks
        self.timeout = timedelta(seconds=timeout)
        self._local_host = advertise_host or host
        self._store = dist.TCPStore(host, 0, None, True, self.timeout, wait_for_workers=False)
        self._pairs: dict[str, Pair] = {}

    def descriptor(self) -> dict[str, Any]:
        return {
            **super().descriptor(),
            **self.identity,
            "store_host": self._local_host,
            "store_port": self._store.port,
            "dist_backend": self.dist_backend,
        }

    def make_group(self, store: Any, rank: int, name: str) -> Any:
        return pair_group(self.dist_backend, store, rank, self.timeout, self._local_host, name)

    def device_tensor(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """`tensor`'s bytes as a flat uint8 tensor, refused unless in host memory or on this plane's
        device (a device tensor elsewhere would need a copy the caller should see and choose)."""
        if tensor.device.type != "cpu" and tensor.device != self.device:
            where = "host memory" if self.device.type == "cpu" else f"host memory and {self.device}"
            raise ValueError(
                f"torchdist over {self.dist_backend} moves {where}; this {what} is on {tensor.device} "
                f"(a plane made with device={tensor.device.type!r} moves that memory)"
            )
        if what == "destination" and not tensor.is_contiguous():
            raise ValueError("a destination tensor must be contiguous")
        return tensor.detach().contiguous().reshape(-1).view(torch.uint8)

    # -- consumer side --------------------------------------------------------------------------------

    def register(self, buffer_id: str, buffer: Any) -> None:
        if isinstance(buffer, torch.Tensor) and buffer.device.type != "cpu":
            self.buffers.add(buffer_id, self.device_tensor(buffer, "destination"))  # type: ignore[arg-type]
            return
        super().register(buffer_id, buffer)

    def on_message(self, header: wire.Header, payload: list[zmq.Frame]) -> None:
        if header.kind == "hello":
            if header.sender in self._pairs:
                self.reject(header, f"process group {header.sender!r} exists already")
                return
            self._pairs[header.sender] = Pair(self, header.sender)
        elif header.kind == "send" and header.sender in self._pairs:
            try:
                batch = [header, *(wire.decode(frame.buffer) for frame in payload)]
            except msgspec.DecodeError as exc:
                self.reject(header, f"malformed batch announcement: {exc}")
                return
            if any(h.kind != "send" or h.sender != header.sender or h.chunk_length <= 0 for h in batch):
                self.reject(header, "a batch announcement mixes kinds or senders, or has an empty chunk")
                return
            self._pairs[header.sender].announce(batch)
        else:
            self.reject(header, f"unexpected {header.kind!r} message (sender {header.sender!r})")

    def drop_pair(self, key: str) -> None:
        self._pairs.pop(key, None)

    @property
    def store(self) -> Any:
        """The store this plane hosts for its producers' groups."""
        return self._store

    # -- producer side --------------------------------------------------------------------------------

    def source(self, obj: Any) -> _Outgoing:
        if isinstance(obj, torch.Tensor):
            flat = self.device_tensor(obj, "source")
            return _Outgoing(flat, ready_event(flat))
        view = byte_view(obj)
        if view.readonly:  # torch wants writable memory even to send; copy immutable sources
            view = memoryview(bytearray(view))
        flat = torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)
        return _Outgoing(flat)

    def send_job(self, sender: PeerSender, job: Job) -> None:
        handle = job.handle
        group = sender.state.get("group") or self._connect(sender)
        try:
            with sender.state["lane"] as lane:
                for batch in self._batches(job.items):
                    sender.check(handle)
                    tensors = self._outgoing(lane, batch)
                    sender.send(_announcement(handle.transfer_id, sender.state["key"], batch), None)
                    settle(post(dist.isend, tensors, group, 0), self.device, self.timeout.total_seconds())
                    handle.add_bytes(sum(t.numel() for t in tensors), job.started)
        except Aborted:
            raise
        except Exception:
            self.release_peer(sender)  # the group is unusable after an error; the next write reconnects
            raise

    def _batches(self, items: list[tuple[_Outgoing, Region]]) -> Iterator[list[Chunk]]:
        """The job's chunks in batches of at most `batch_chunks` chunks and `batch_bytes` bytes (a
        single chunk may exceed it): one announcement and one `batch_isend_irecv` each."""
        batch: list[Chunk] = []
        size = 0
        for out, region in items:
            for start in range(0, region.length, self.chunk_bytes):
                n = min(self.chunk_bytes, region.length - start)
                if batch and (len(batch) == self.batch_chunks or size + n > self.batch_bytes):
                    yield batch
                    batch, size = [], 0
                batch.append((out, region, start, n))
                size += n
        if batch:
            yield batch

    def _outgoing(self, lane: Lane, batch: list[Chunk]) -> list[torch.Tensor]:
        """The batch's chunks on this plane's device: device sources in place (after their producer's
        kernels), host sources copied into one staging tensor when the plane is on an accelerator."""
        staged = sum(n for out, _, _, n in batch if out.tensor.device != self.device)
        staging = torch.empty(staged, dtype=torch.uint8, device=self.device) if staged else None
        tensors, used = [], 0
        for out, _, start, n in batch:
            chunk = out.tensor[start : start + n]
            lane.wait(out.ready)
            if staging is not None and chunk.device != self.device:
                chunk = staging[used : used + n].copy_(chunk)
                used += n
            tensors.append(chunk)
        return tensors

    def _connect(self, sender: PeerSender) -> Any:
        peer = sender.peer
        if (problem := pairing_problem(self.descriptor(), peer)) is not None:
            raise ValueError(f"torchdist refuses this pair: {problem}")
        address = (peer["store_host"], peer["store_port"])
        try:  # fail fast on a dead peer; the store client would retry (and log) until its timeout
            socket.create_connection(address, timeout=min(5.0, self.timeout.total_seconds())).close()
        except OSError as exc:
            raise ConnectionError(
                f"cannot reach the peer's store at {address[0]}:{address[1]}: {exc}"
            ) from exc
        store = dist.TCPStore(address[0], address[1], None, False, self.timeout)
        key = f"{self.id}-{uuid.uuid4().hex[:8]}"
        sender.send([wire.encode(wire.Header("", "", 0, 0, "hello", sender=key))], None)
        group = self.make_group(dist.PrefixStore(key, store), rank=1, name=key)
        sender.state.update(group=group, store=store, key=key, lane=Lane(self.device))
        return group

    def release_peer(self, sender: PeerSender) -> None:
        if (group := sender.state.get("group")) is not None:
            release_group(group, self.dist_backend)
        sender.state.clear()

    def close(self) -> None:
        if self._closed.is_set():
            return
        super().close()
        for pair in list(self._pairs.values()):
            pair.stop()
        self._store = None  # stops the store's server once no pair thread holds a prefix of it
