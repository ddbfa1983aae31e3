"""fake: in-process only, for unit tests of services; write() copies at once and both sides succeed.

Consumers are found through a module-level registry keyed by descriptor id, so a test can wire a
producer and a consumer in one process exactly as the services do across processes (descriptor on the
control plane, write(), expect()). Consumer bookkeeping is the real Ledger, so prefetch, abort and
out-of-bounds rules behave as in the socket backends.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from common.dataplane.base import DataPlane, Region, Source, TransferHandle
from common.dataplane.ledger import Ledger
from common.dataplane.memory import BufferTable, HostBuffers, byte_view

log = logging.getLogger("epd.dataplane")

_planes: weakref.WeakValueDictionary[str, FakeDataPlane] = weakref.WeakValueDictionary()
_planes_lock = threading.Lock()


class FakeDataPlane(HostBuffers, DataPlane):
    backend = "fake"

    def __init__(self, *, ttl: float = 60.0, max_remembered: int = 10_000, **_: Any) -> None:
        super().__init__()
        self.buffers = BufferTable()
        self.ledger = Ledger(
            ttl=ttl,
            max_remembered=max_remembered,
            on_success=lambda h: self.count_received(seconds=h.seconds),
        )
        self._closed = False
        with _planes_lock:
            _planes[self.id] = self

    def descriptor(self) -> dict[str, Any]:
        return {"backend": self.backend, "id": self.id}

    def expect(self, transfer_id: str, regions: Sequence[Region]) -> TransferHandle:
        for region in regions:
            if (problem := self.buffers.problem(region)) is not None:
                raise ValueError(f"transfer {transfer_id!r}: {problem}")
        return self.ledger.expect(transfer_id, regions)

    def write(
        self, peer: dict[str, Any], transfer_id: str, items: Sequence[tuple[Source, Region]]
    ) -> TransferHandle:
        handle = TransferHandle(transfer_id)
        views = [(byte_view(source), region) for source, region in items]
        for view, region in views:
            if view.nbytes != region.length:
                raise ValueError(f"transfer {transfer_id!r}: source of {view.nbytes} bytes for {region}")
        with _planes_lock:
            consumer = _planes.get(peer.get("id", ""))
        if consumer is None or consumer._closed:
            handle.fail(f"no fake data plane with id {peer.get('id')!r} in this process")
            return handle
        began = time.monotonic()
        for view, region in views:
            if (problem := consumer._receive(transfer_id, view, region)) is not None:
                handle.fail(problem)
                return handle
            handle.add_bytes(view.nbytes, began)
        handle.succeed()
        self.count_sent(handle.bytes, handle.seconds)
        return handle

    def _receive(self, transfer_id: str, view: memoryview, region: Region) -> str | None:
        if (problem := self.buffers.problem(region)) is not None:
            log.warning("dropping bytes for transfer %s: %s", transfer_id, problem)
            self.ledger.fail(transfer_id, problem)
            return problem
        dest = self.buffers.view(region.buffer_id, region.offset, region.end)
        assert dest is not None

        def copy() -> None:
            dest[:] = view

        if self.ledger.deliver(transfer_id, region.buffer_id, region.offset, region.end, copy):
            self.count_received(region.length)
        return None

    def close(self) -> None:
        self._closed = True
        with _planes_lock:
            _planes.pop(self.id, None)
