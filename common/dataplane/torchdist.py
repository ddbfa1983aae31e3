"""torchdist: point-to-point send/recv over a torch.distributed process group per producer/consumer pair.

No global default group: the consumer hosts a `TCPStore`, and each producer that writes to it opens a
two-rank group under its own store prefix (producer rank 1, consumer rank 0). The ZeroMQ channel carries
the coordination: "hello" asks the consumer to join a new group, then each chunk is announced by a "send"
header just before the producer sends it, and a per-pair thread on the consumer posts the matching recv
straight into the destination region (`torch.frombuffer` over the buffer). Sends and recvs of a pair use
one tag and match by order, which the single PUSH socket and the single sender thread per peer keep.
Each direction between two processes is its own group, so it does not matter which side writes first.

Backends: "gloo" (CPU, the default and the only one tested), "nccl" (CUDA), "hccl" (Ascend, through
torch_npu, imported only then). Limits:

- destinations are host memory; with nccl/hccl each chunk is staged through device memory on both sides
  (registering device tensors as destinations is not supported yet);
- abort() takes effect between chunks (`chunk_bytes`): an announced chunk is always sent, since the
  consumer has posted its recv; bytes of a chunk in flight when the consumer aborts still land;
- a producer that dies mid-chunk leaves the consumer's recv waiting until `timeout`, then that pair is
  dropped (its transfers fail) and the producer's next write opens a new group;
- the channel is trusted: a forged "send" header for a live pair would desynchronise it until timeout.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import zmq

from common.dataplane import wire
from common.dataplane.channel import ChannelDataPlane
from common.dataplane.memory import byte_view
from common.dataplane.sender import Job, PeerSender

log = logging.getLogger("epd.dataplane")

DIST_BACKENDS = ("gloo", "nccl", "hccl")
_TAG = 0


def _device_for(dist_backend: str) -> torch.device:
    """Check the collective library is usable here; the device its tensors must live on."""
    if dist_backend == "gloo":
        if not dist.is_gloo_available():
            raise RuntimeError("torch.distributed was built without gloo")
        return torch.device("cpu")
    if dist_backend == "nccl":
        if not (dist.is_nccl_available() and torch.cuda.is_available()):
            raise RuntimeError("torchdist backend 'nccl' needs a CUDA build of torch and a visible GPU")
        return torch.device("cuda", torch.cuda.current_device())
    if dist_backend == "hccl":
        try:
            import torch_npu  # noqa: F401  (registers the npu device and HCCL)
        except ImportError as exc:
            raise RuntimeError(
                "torchdist backend 'hccl' needs torch_npu and Huawei's CANN runtime (pip install '.[npu]')"
            ) from exc
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    raise ValueError(f"unknown torchdist backend {dist_backend!r}; choose one of {', '.join(DIST_BACKENDS)}")


class TorchDistDataPlane(ChannelDataPlane):
    backend = "torchdist"

    def __init__(
        self,
        *,
        dist_backend: str = "gloo",
        chunk_bytes: int = 32 << 20,
        timeout: float = 60.0,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        **options: Any,
    ) -> None:
        self.device = _device_for(dist_backend)
        super().__init__(host=host, advertise_host=advertise_host, **options)
        self.dist_backend = dist_backend
        self.chunk_bytes = chunk_bytes
        self.timeout = timedelta(seconds=timeout)
        self._local_host = advertise_host or host
        self._store = dist.TCPStore(host, 0, None, True, self.timeout, wait_for_workers=False)
        self._pairs: dict[str, _Pair] = {}

    def descriptor(self) -> dict[str, Any]:
        return {
            **super().descriptor(),
            "store_host": self._local_host,
            "store_port": self._store.port,
            "dist_backend": self.dist_backend,
        }

    def make_group(self, store: Any, rank: int) -> Any:
        """A two-rank process group on `store` (blocks until the other rank joins)."""
        if self.dist_backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self._local_host)]
            opts._timeout = self.timeout
            return dist.ProcessGroupGloo(store, rank, 2, opts)
        if self.dist_backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            return dist.ProcessGroupNCCL(store, rank, 2, opts)
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL  # type: ignore[import-not-found]

        opts = ProcessGroupHCCL.Options()
        opts._timeout = self.timeout
        return ProcessGroupHCCL(store, rank, 2, opts)

    # -- consumer side --------------------------------------------------------------------------------

    def on_message(self, header: wire.Header, payload: list[zmq.Frame]) -> None:
        if header.kind == "hello":
            if header.sender in self._pairs:
                self.reject(header, f"process group {header.sender!r} exists already")
                return
            self._pairs[header.sender] = _Pair(self, header.sender)
        elif header.kind == "send" and not payload and header.sender in self._pairs:
            self._pairs[header.sender].announce(header)
        else:
            self.reject(header, f"unexpected {header.kind!r} message (sender {header.sender!r})")

    def drop_pair(self, key: str) -> None:
        self._pairs.pop(key, None)

    # -- producer side --------------------------------------------------------------------------------

    def source(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, torch.Tensor):
            return obj.detach().contiguous().reshape(-1).view(torch.uint8)
        view = byte_view(obj)
        if view.readonly:  # torch wants writable memory even to send; copy immutable sources
            view = memoryview(bytearray(view))
        return torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)

    def send_job(self, sender: PeerSender, job: Job) -> None:
        handle = job.handle
        group = sender.state.get("group") or self._connect(sender)
        try:
            for tensor, region in job.items:
                for start in range(0, region.length, self.chunk_bytes):
                    sender.check(handle)
                    chunk = tensor[start : start + self.chunk_bytes]
                    header = wire.Header(
                        handle.transfer_id,
                        region.buffer_id,
                        region.offset,
                        region.length,
                        "send",
                        chunk_offset=start,
                        chunk_length=chunk.numel(),
                        sender=sender.state["key"],
                    )
                    sender.send([wire.encode(header)], None)
                    group.send([chunk.to(self.device)], 0, _TAG).wait()
                    handle.add_bytes(chunk.numel(), job.started)
        except RuntimeError:
            sender.state.clear()  # the group is unusable after an error; the next write reconnects
            raise

    def _connect(self, sender: PeerSender) -> Any:
        peer = sender.peer
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
        group = self.make_group(dist.PrefixStore(key, store), rank=1)
        sender.state.update(group=group, store=store, key=key)
        return group

    def close(self) -> None:
        if self._closed.is_set():
            return
        super().close()
        for pair in list(self._pairs.values()):
            pair.stop()
        self._store = None  # stops the store's server once no pair thread holds a prefix of it


class _Pair:
    """The consumer's end of one producer's group: a thread posting recvs in announcement order."""

    def __init__(self, plane: TorchDistDataPlane, key: str) -> None:
        self.plane = plane
        self.key = key
        self._announced: queue.Queue[wire.Header | None] = queue.Queue()
        self._scratch = torch.empty(0, dtype=torch.uint8, device=plane.device)
        self._thread = threading.Thread(target=self._run, name=f"epd-dataplane-pair-{key[:8]}", daemon=True)
        self._thread.start()

    def announce(self, header: wire.Header) -> None:
        self._announced.put(header)

    def stop(self) -> None:
        self._announced.put(None)
        self._thread.join(timeout=1)

    def _run(self) -> None:
        plane = self.plane
        try:
            group = plane.make_group(dist.PrefixStore(self.key, plane._store), rank=0)
            while (header := self._announced.get()) is not None:
                self._receive(group, header)
        except Exception as exc:
            log.warning("process group %s failed: %s", self.key, exc)
            plane.drop_pair(self.key)
            while not self._announced.empty():
                if (header := self._announced.get()) is not None:
                    plane.ledger.fail(header.transfer_id, f"process group failed: {exc}")

    def _receive(self, group: Any, header: wire.Header) -> None:
        """Post the recv the producer is about to match; bytes that are not wanted go to scratch."""
        plane = self.plane
        n = header.chunk_length
        start = header.offset + header.chunk_offset
        problem = plane.buffers.problem(header.region)
        if problem is None and (header.chunk_offset < 0 or start + n > header.region.end):
            problem = "chunk lies outside its region"
        dest = None if problem else plane.buffers.view(header.buffer_id, start, start + n)
        if problem is None and dest is None:
            problem = f"buffer {header.buffer_id!r} is gone"
        keep = dest is not None and plane.ledger.admits(header.transfer_id)
        direct = keep and plane.device.type == "cpu"
        if direct:
            target = torch.frombuffer(dest, dtype=torch.uint8)
        else:
            if self._scratch.numel() < n:
                self._scratch = torch.empty(n, dtype=torch.uint8, device=plane.device)
            target = self._scratch[:n]
        began = time.monotonic()
        try:
            group.recv([target], 1, _TAG).wait()
        except RuntimeError as exc:
            plane.ledger.fail(header.transfer_id, f"receive failed: {exc}")
            raise
        if problem is not None:
            plane.reject(header, problem)
        elif not keep:
            log.info("dropped %d bytes for finished transfer %s", n, header.transfer_id)
        else:
            if not direct:
                torch.frombuffer(dest, dtype=torch.uint8).copy_(target)
            if plane.ledger.deliver(header.transfer_id, header.buffer_id, start, start + n, began=began):
                plane.count_received(n)
