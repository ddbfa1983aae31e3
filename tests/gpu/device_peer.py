"""A device data plane (torchdist, cudaipc) in a process of its own, driven by JSON lines, for tests/gpu.

`python device_peer.py BACKEND DEVICE [OPTIONS_JSON]` makes one plane whose memory is on DEVICE (its own
process's GPU: the tests set CUDA_VISIBLE_DEVICES) and answers one JSON line per command. Only plain
JSON crosses: descriptors, ids, regions, seeds; the bytes move over the backend (NCCL, CUDA IPC) and
are checked where they land.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from common.dataplane import Region, create_dataplane  # noqa: E402
from tests.common.dataplane.dataplane_peer import answer_lines  # noqa: E402


def pattern(length: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Bytes that differ along the buffer and per seed, so shifted, swapped or stale data shows."""
    return ((torch.arange(length, dtype=torch.int64, device=device) * 131 + seed * 7919) % 251).to(
        torch.uint8
    )


class Agent:
    def __init__(self, backend: str, device: str, **options: Any) -> None:
        if backend == "torchdist":
            options["device"] = device  # its collective library follows the device
        self.plane = create_dataplane(backend, **options)
        self.device = torch.device(device)
        self.buffers: dict[str, Any] = {}  # device tensors, or host memoryviews
        self.handles: dict[str, Any] = {}
        self.sources: dict[str, torch.Tensor] = {}

    def op_descriptor(self) -> dict[str, Any]:
        return {"descriptor": self.plane.descriptor(), "devices": list(self.plane.devices)}

    def op_register(self, buffer_id: str, nbytes: int) -> dict[str, Any]:
        self.buffers[buffer_id] = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        self.plane.register(buffer_id, self.buffers[buffer_id])
        return {"ok": True}

    def op_allocate(self, buffer_id: str, nbytes: int) -> dict[str, Any]:
        self.buffers[buffer_id] = self.plane.allocate(buffer_id, nbytes)
        return {"ok": True}

    def op_expect(self, tid: str, regions: list[list[Any]]) -> dict[str, Any]:
        self.handles[tid] = self.plane.expect(tid, [Region(*r) for r in regions])
        return {"ok": True}

    def op_write(self, peer: dict, tid: str, region: list[Any], seed: int, where: str) -> dict[str, Any]:
        """Write a pattern from device memory (`where="device"`) or host memory into the peer."""
        source = pattern(region[2], seed, self.device if where == "device" else "cpu")
        self.sources[tid] = source
        self.handles[tid] = self.plane.write(peer, tid, [(source, Region(*region))])
        return {"ok": True}

    def op_wait(self, tid: str, timeout: float) -> dict[str, Any]:
        handle = self.handles[tid]
        state = handle.wait(timeout)
        return {"state": state.value, "bytes": handle.bytes, "failure": handle.failure()}

    def op_free(self, buffer_id: str) -> dict[str, Any]:
        self.plane.free(buffer_id)
        self.buffers.pop(buffer_id, None)
        return {"ok": True}

    def op_abort(self, tid: str) -> dict[str, Any]:
        self.handles[tid].abort()
        return {"ok": True}

    def op_check(self, buffer_id: str, offset: int, length: int, seed: int) -> dict[str, Any]:
        """Whether the bytes landed intact, and nothing next to them changed (the buffer starts zero)."""
        buf = self.buffers[buffer_id]
        data = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8)
        data = data.cpu()
        inside = torch.equal(data[offset : offset + length], pattern(length, seed))
        outside = not data[:offset].any() and not data[offset + length :].any()
        return {"match": inside, "untouched_elsewhere": outside}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return getattr(self, f"op_{cmd.pop('op')}")(**cmd)

    def close(self) -> None:
        self.plane.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    answer_lines(Agent(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")))


if __name__ == "__main__":
    main()
