"""cudaipc: producer and consumer on one host, device memory copied device to device by CUDA IPC.

For one GPU shared by several processes, or GPUs of one machine with peer access. A consumer
`register()`s device tensors (decode's KV pool, prefill's feature arena): each is exported by CUDA IPC
handle into a small shared-memory page (`cudaipc_exports`). A producer maps a buffer once, on its first
write to it, and copies each source into it on a side stream of its own: the copies wait (one event per
write(), recorded on the caller's stream when it calls write()) for the kernels that produced the
source, and run beside whatever the caller's stream does next. So a prefill that writes each layer's KV
as the layer finishes has that layer cross while the next one computes. When the side stream has
finished, one "done" notice per buffer tells the consumer, exactly as shm does.

Host memory works as in shm (this plane is shm with device buffers added): `allocate()` gives a shared
segment, a device source written into host memory is copied device to host, a host source into a
device buffer host to device. `register()` of host memory is refused, as in shm.

Abort: the producer checks the consumer's abort board between sources, so at most the sources already
queued on the side stream still land after a consumer's abort (`abort_fence_s`, as shm).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.dataplane import wire
from common.dataplane.base import Region, Source, TransferHandle
from common.dataplane.cudaipc_exports import ExportPage, MappedBuffer, flat_bytes
from common.dataplane.memory import byte_view
from common.dataplane.sender import Aborted, Job, PeerSender
from common.dataplane.shm import ShmDataPlane, spans_encoder

SETTLE_SLICE_S = 0.0002  # how often a waiting sender looks at its side stream (and at aborts)


@dataclass(slots=True)
class _DeviceSource:
    """A device tensor to send and the event after which its bytes are final."""

    flat: torch.Tensor
    ready: torch.cuda.Event | None

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


class CudaIpcDataPlane(ShmDataPlane):
    backend = "cudaipc"
    devices = ("cpu", "cuda")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._exports: dict[str, ExportPage] = {}

    # -- consumer side --------------------------------------------------------------------------------

    def register(self, buffer_id: str, buffer: Any) -> None:
        if not (isinstance(buffer, torch.Tensor) and buffer.device.type == "cuda"):
            super().register(buffer_id, buffer)  # raises: host memory comes from allocate(), as in shm
        flat = flat_bytes(buffer)
        self.buffers.add(buffer_id, flat)  # type: ignore[arg-type]  (sized by .nbytes, like a view)
        try:
            self._exports[buffer_id] = ExportPage(self.id, buffer_id, flat)
        except BaseException:
            self.buffers.remove(buffer_id)
            raise

    def free(self, buffer_id: str) -> None:
        page = self._exports.pop(buffer_id, None)
        if page is None:
            super().free(buffer_id)
            return
        page.withdraw()
        self.buffers.remove(buffer_id)

    def close(self) -> None:
        if self._closed.is_set():
            return
        for buffer_id in list(self._exports):
            self.free(buffer_id)
        super().close()

    # -- producer side --------------------------------------------------------------------------------

    def write(
        self, peer: dict[str, Any], transfer_id: str, items: Sequence[tuple[Source, Region]]
    ) -> TransferHandle:
        """As every plane's; device sources are read once the caller's stream reaches this call."""
        ready: dict[torch.device, torch.cuda.Event] = {}
        wrapped = []
        for source, region in items:
            if isinstance(source, torch.Tensor) and source.device.type == "cuda":
                flat = source.detach().contiguous().reshape(-1).view(torch.uint8)
                if flat.device not in ready:
                    ready[flat.device] = torch.cuda.Event()
                    ready[flat.device].record(torch.cuda.current_stream(flat.device))
                source = _DeviceSource(flat, ready[flat.device])
            wrapped.append((source, region))
        return super().write(peer, transfer_id, wrapped)

    def source(self, obj: Source) -> Any:
        return obj if isinstance(obj, _DeviceSource) else byte_view(obj)

    def send_job(self, sender: PeerSender, job: Job) -> None:
        device_items, host_items = [], []
        for source, region in job.items:
            if region.length == 0:
                continue
            mapped = self._mapped(sender, region.buffer_id)
            if mapped is not None:
                device_items.append((source, region, mapped))
            else:
                host_items.append((_host_bytes(source), region))
        if device_items:
            self._copy_to_device(sender, job, device_items)
        if host_items:
            super().send_job(sender, Job(job.handle, host_items, job.nbytes, job.started))

    def _copy_to_device(self, sender: PeerSender, job: Job, items: list[tuple[Any, Region, Any]]) -> None:
        handle = job.handle
        board = self._abort_board(sender)
        first = items[0][0]
        device = first.flat.device if isinstance(first, _DeviceSource) else items[0][2].tensor.device
        stream = self._stream(sender, device)
        written: dict[str, list[tuple[int, int]]] = {}
        waited: set[int] = set()
        with torch.cuda.stream(stream):
            for source, region, mapped in items:
                sender.check(handle)
                if board.posted(handle.transfer_id):
                    raise Aborted("aborted by the consumer")
                if region.end > mapped.tensor.numel():
                    raise ValueError(
                        f"region [{region.offset}, {region.end}) lies outside buffer {region.buffer_id!r} "
                        f"of {mapped.tensor.numel()} bytes"
                    )
                if isinstance(source, _DeviceSource):
                    if source.ready is not None and id(source.ready) not in waited:
                        stream.wait_event(source.ready)
                        waited.add(id(source.ready))
                    src = source.flat
                else:
                    src = torch.from_numpy(np.frombuffer(source, dtype=np.uint8))
                mapped.tensor[region.offset : region.end].copy_(src, non_blocking=True)
                written.setdefault(region.buffer_id, []).append((region.offset, region.length))
            done = torch.cuda.Event()
            done.record(stream)
        while not done.query():  # on this sender's thread: the caller never waits for a copy
            sender.check(handle)
            time.sleep(SETTLE_SLICE_S)
        handle.add_bytes(sum(r.length for _, r, _ in items), job.started)
        for buffer_id, spans in written.items():
            header = wire.Header(
                handle.transfer_id, buffer_id, spans[0][0], spans[0][1], "done", started=job.started
            )
            sender.send([wire.encode(header), spans_encoder.encode(spans)], handle)

    def _mapped(self, sender: PeerSender, buffer_id: str) -> MappedBuffer | None:
        """The peer's device buffer of that id, mapped once; None when it is host memory."""
        cache: dict[str, MappedBuffer] = sender.state.setdefault("mapped", {})
        mapped = cache.get(buffer_id)
        if mapped is not None and not mapped.live:  # freed since: perhaps registered again
            cache.pop(buffer_id).close()
            mapped = None
        if mapped is None:
            try:
                mapped = cache[buffer_id] = MappedBuffer(sender.peer["id"], buffer_id)
            except FileNotFoundError:
                return None
        return mapped

    @staticmethod
    def _stream(sender: PeerSender, device: torch.device) -> torch.cuda.Stream:
        streams: dict[torch.device, torch.cuda.Stream] = sender.state.setdefault("streams", {})
        if device not in streams:
            streams[device] = torch.cuda.Stream(device=device)
        return streams[device]

    def release_peer(self, sender: PeerSender) -> None:
        for mapped in sender.state.pop("mapped", {}).values():
            mapped.close()
        sender.state.pop("streams", None)
        super().release_peer(sender)


def _host_bytes(source: Any) -> Any:
    """A source for a host destination: a device source copied to host once its bytes are final."""
    if not isinstance(source, _DeviceSource):
        return source
    if source.ready is not None:
        torch.cuda.current_stream(source.flat.device).wait_event(source.ready)
    return source.flat.cpu().numpy().data
