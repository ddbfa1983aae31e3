"""The torch side of cudaipc: exporting a consumer's device buffer, and mapping it in a producer.

A CUDA IPC handle names one allocation of the CUDA caching allocator; torch hands it out (with the
storage's offset inside that allocation, a shared reference counter that keeps the allocation alive
while another process maps it, and an event for the first use) through `UntypedStorage._share_cuda_`,
and maps one with `UntypedStorage._new_shared_cuda`: the calls `torch.multiprocessing` makes when it
sends a CUDA tensor to another process. Here those fields travel as a typed msgspec struct (raw handle
bytes, never a pickled tensor), published in a small shared-memory page per buffer
(`shm_segments`), so a producer finds a buffer registered after the descriptor went out, and notices
(the page's live flag) when it was freed and perhaps registered again under the same id.

A process cannot map its own handles (CUDA refuses), so an export remembers the pid that made it and a
producer in that same process uses the tensor itself, from this module's table.
"""

from __future__ import annotations

import os
import threading

import msgspec
import numpy as np
import torch

from common.dataplane import shm_segments as seg
from common.dataplane.device_identity import uuid_text

PAGE_BYTES = 1024  # an encoded export is about 200 bytes
_LENGTH = np.dtype("<u4")


class IpcExport(msgspec.Struct, array_like=True, frozen=True):
    """What a producer needs to map one consumer buffer (the fields of `_share_cuda_`)."""

    pid: int
    device: int  # the index in the exporting process (its CUDA_VISIBLE_DEVICES may differ from ours)
    device_uuid: str
    handle: bytes
    storage_bytes: int
    storage_offset: int  # of the storage inside the allocation the handle names
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    byte_offset: int  # of the buffer inside its storage
    nbytes: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(IpcExport)
_local: dict[tuple[str, str], torch.Tensor] = {}  # (plane id, buffer id) -> flat uint8 buffer
_local_lock = threading.Lock()


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's memory as a flat uint8 tensor over the same storage (contiguous tensors only)."""
    if not tensor.is_contiguous():
        raise ValueError("a cudaipc buffer must be a contiguous tensor")
    return tensor.detach().reshape(-1).view(torch.uint8)


def export(tensor: torch.Tensor) -> IpcExport:
    storage = tensor.untyped_storage()
    device, handle, size, offset, ref_handle, ref_offset, event, sync = storage._share_cuda_()
    return IpcExport(
        pid=os.getpid(), device=int(device), device_uuid=device_uuid(int(device)), handle=bytes(handle), storage_bytes=int(size),
        storage_offset=int(offset), ref_counter_handle=bytes(ref_handle), ref_counter_offset=int(ref_offset),
        event_handle=bytes(event or b""), event_sync_required=bool(sync),
        byte_offset=tensor.storage_offset() * tensor.element_size(), nbytes=tensor.numel() * tensor.element_size(),
    )  # fmt: skip


def device_uuid(index: int) -> str:
    return uuid_text(getattr(torch.cuda.get_device_properties(index), "uuid", None))


def local_index(uuid: str) -> int:
    """This process's index of the GPU named `uuid` (device numbering differs between processes)."""
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    raise ValueError(f"the consumer's GPU {uuid} is not visible in this process (CUDA_VISIBLE_DEVICES)")


def open_export(exp: IpcExport) -> torch.Tensor:
    """Map another process's buffer; the flat uint8 tensor keeps the mapping for as long as it lives."""
    torch.cuda._lazy_init()
    index = local_index(exp.device_uuid)
    storage = torch.UntypedStorage._new_shared_cuda(
        index, exp.handle, exp.storage_bytes, exp.storage_offset, exp.ref_counter_handle,
        exp.ref_counter_offset, exp.event_handle, exp.event_sync_required,
    )  # fmt: skip
    whole = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}")
    whole.set_(storage, 0, (exp.storage_bytes,), (1,))
    return whole[exp.byte_offset : exp.byte_offset + exp.nbytes]


class ExportPage:
    """The consumer's page for one exported buffer: a length-prefixed encoded `IpcExport`."""

    def __init__(self, plane_id: str, buffer_id: str, tensor: torch.Tensor) -> None:
        self.key = (plane_id, buffer_id)
        payload = _encoder.encode(export(tensor))
        if len(payload) + _LENGTH.itemsize > PAGE_BYTES:
            raise ValueError(f"a CUDA IPC export of {len(payload)} bytes does not fit its page")
        self.shm = seg.create(page_name(plane_id, buffer_id), PAGE_BYTES)
        body = np.frombuffer(self.shm.buf, dtype=np.uint8, offset=seg.HEADER_BYTES)
        framed = len(payload).to_bytes(_LENGTH.itemsize, "little") + payload
        body[: len(framed)] = np.frombuffer(framed, dtype=np.uint8)
        del body
        with _local_lock:
            _local[self.key] = tensor

    def withdraw(self) -> None:
        """Producers mapping it from now on find no page; those holding a mapping see it is freed."""
        with _local_lock:
            _local.pop(self.key, None)
        seg.mark_freed(self.shm)
        seg.destroy(self.shm)


def page_name(plane_id: str, buffer_id: str) -> str:
    return seg.segment_name(plane_id, f"{buffer_id}\0cudaipc")


class MappedBuffer:
    """A producer's view of one consumer device buffer, and the page that says whether it still lives."""

    def __init__(self, plane_id: str, buffer_id: str) -> None:
        """Raises FileNotFoundError when the consumer exported no device buffer of that id."""
        self.page = seg.Attachment(page_name(plane_id, buffer_id))
        try:
            length = int(self.page.data[: _LENGTH.itemsize].view(_LENGTH)[0])
            exp = _decoder.decode(self.page.data[_LENGTH.itemsize : _LENGTH.itemsize + length].tobytes())
            if exp.pid == os.getpid():
                with _local_lock:
                    tensor = _local.get((plane_id, buffer_id))
                if tensor is None:
                    raise FileNotFoundError(buffer_id)
                self.tensor = tensor
            else:
                self.tensor = open_export(exp)
        except BaseException:
            self.page.close()
            raise

    @property
    def live(self) -> bool:
        return self.page.live

    def close(self) -> None:
        del self.tensor
        self.page.close()
