"""torchdist's consumer side of one pair: a thread posting each announced batch of recvs in order.

A producer's "hello" makes one `Pair`; its thread joins the two-rank group (rank 0), then takes the
batches the receiving thread announces, in order, and posts each as one `dist.batch_isend_irecv`, as
the producer posted its sends. Bytes land in place when the destination is on the plane's device
(host memory for gloo, a registered device tensor for nccl/hccl); otherwise in a scratch tensor on the
device, copied to host afterwards, or dropped when nobody wants them (a finished transfer, a bad
region, a freed buffer): the recv is posted either way, or the pair would lose its order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from common.dataplane import wire
from common.dataplane.torchdist_device import Lane, post, release_group, settle

if TYPE_CHECKING:
    from common.dataplane.torchdist import TorchDistDataPlane

log = logging.getLogger("epd.dataplane")


class Pair:
    """The consumer's end of one producer's group: a thread posting recvs in announcement order."""

    def __init__(self, plane: TorchDistDataPlane, key: str) -> None:
        self.plane = plane
        self.key = key
        self._announced: queue.Queue[list[wire.Header] | None] = queue.Queue()
        self._scratch: torch.Tensor | None = None  # made on the pair's thread, on its lane's stream
        self._thread = threading.Thread(target=self._run, name=f"epd-dataplane-pair-{key[:8]}", daemon=True)
        self._thread.start()

    def announce(self, batch: list[wire.Header]) -> None:
        self._announced.put(batch)

    def stop(self) -> None:
        self._announced.put(None)
        self._thread.join(timeout=1)

    def _run(self) -> None:
        plane, group = self.plane, None
        try:
            with Lane(plane.device):
                group = plane.make_group(dist.PrefixStore(self.key, plane.store), rank=0, name=self.key)
                while (batch := self._announced.get()) is not None:
                    self._receive(group, batch)
        except Exception as exc:
            log.warning("process group %s failed: %s", self.key, exc)
            plane.drop_pair(self.key)
            while not self._announced.empty():
                for header in self._announced.get() or []:
                    plane.ledger.fail(header.transfer_id, f"process group failed: {exc}")
        finally:
            if group is not None:
                release_group(group, plane.dist_backend)

    def _receive(self, group: Any, batch: list[wire.Header]) -> None:
        """Post the batch of recvs the producer is about to match: straight into the destination where
        it is on the plane's device (host memory for gloo), else into scratch (staged bytes to copy to
        host, and bytes nobody wants: a finished transfer, a bad region, a freed buffer)."""
        plane = self.plane
        plans = [self._plan(header) for header in batch]
        staged = sum(h.chunk_length for h, _, _, direct in plans if not direct)
        scratch = self._scratch
        if scratch is None or scratch.numel() < staged:
            scratch = self._scratch = torch.empty(staged, dtype=torch.uint8, device=plane.device)
        targets, used = [], 0
        for header, dest, _, direct in plans:
            if direct:
                targets.append(
                    dest if isinstance(dest, torch.Tensor) else torch.frombuffer(dest, dtype=torch.uint8)
                )
            else:
                targets.append(scratch[used : used + header.chunk_length])
                used += header.chunk_length
        began = time.monotonic()
        try:
            settle(post(dist.irecv, targets, group, 1), plane.device, plane.timeout.total_seconds())
        except Exception as exc:
            for header in batch:
                plane.ledger.fail(header.transfer_id, f"receive failed: {exc}")
            raise
        for (header, dest, problem, direct), target in zip(plans, targets, strict=True):
            start = header.offset + header.chunk_offset
            if problem is not None:
                plane.reject(header, problem)
            elif dest is None:
                log.info("dropped %d bytes for finished transfer %s", header.chunk_length, header.transfer_id)
            else:
                if not direct:
                    torch.frombuffer(dest, dtype=torch.uint8).copy_(target)
                end = start + header.chunk_length
                if plane.ledger.deliver(header.transfer_id, header.buffer_id, start, end, began=began):
                    plane.count_received(header.chunk_length)

    def _plan(self, header: wire.Header) -> tuple[wire.Header, Any, str | None, bool]:
        """(header, destination or None when the bytes are not kept, problem, lands in place)."""
        plane = self.plane
        n, start = header.chunk_length, header.offset + header.chunk_offset
        problem = plane.buffers.problem(header.region)
        if problem is None and (header.chunk_offset < 0 or start + n > header.region.end):
            problem = "chunk lies outside its region"
        dest = None if problem else plane.buffers.view(header.buffer_id, start, start + n)
        if problem is None and dest is None:
            problem = f"buffer {header.buffer_id!r} is gone"
        if dest is None or not plane.ledger.admits(header.transfer_id):
            return header, None, problem, False
        on_device = isinstance(dest, torch.Tensor)
        return header, dest, None, on_device or plane.device.type == "cpu"
