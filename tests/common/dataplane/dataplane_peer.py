"""A data-plane peer driven by JSON lines on stdin, for tests that need a second real process.

`python dataplane_peer.py BACKEND` creates one data plane and answers one JSON line per command on
stdout (logs go to stderr). Only plain JSON crosses between the processes: descriptors, transfer ids,
regions and pattern seeds; the bytes themselves move over the data plane under test. Tests for the
in-process fake backend run the same `Agent` in their own process.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from common.dataplane import Region, TransferHandle, create_dataplane  # noqa: E402


def pattern(length: int, seed: int) -> np.ndarray:
    """Bytes that differ at every 8-byte word and for every seed, so shifted or swapped data shows."""
    words = np.arange((length + 7) // 8, dtype=np.uint64) + np.uint64((seed % (1 << 24)) << 40)
    return words.view(np.uint8)[:length]


def region(item: list[Any]) -> Region:
    return Region(str(item[0]), int(item[1]), int(item[2]))


class Agent:
    """One data plane and the transfers it has started, by transfer id."""

    def __init__(self, backend: str, **options: Any) -> None:
        self.plane = create_dataplane(backend, **options)
        self.handles: dict[str, TransferHandle] = {}
        self.sources: dict[str, list[np.ndarray]] = {}
        self.buffers: dict[str, memoryview] = {}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return getattr(self, f"op_{cmd.pop('op')}")(**cmd)

    def op_descriptor(self) -> dict[str, Any]:
        return {"descriptor": self.plane.descriptor()}

    def op_write(
        self, peer: dict[str, Any], tid: str, items: list[list[Any]], abort: bool = False, wait: float = 0.0
    ) -> dict[str, Any]:
        sources = [pattern(int(item[2]), int(item[3])) for item in items]
        handle = self.plane.write(
            peer, tid, [(src, region(item)) for src, item in zip(sources, items, strict=True)]
        )
        if abort:
            handle.abort()
        self.handles[tid], self.sources[tid] = handle, sources
        return self.op_wait(tid, wait) if wait else {"ok": True}

    def op_wait(self, tid: str, timeout: float) -> dict[str, Any]:
        handle = self.handles[tid]
        state = handle.wait(timeout)
        if state.done:
            self.sources.pop(tid, None)
        return {
            "state": state.value,
            "bytes": handle.bytes,
            "seconds": handle.seconds,
            "failure": handle.failure(),
        }

    def op_allocate(self, buffer_id: str, nbytes: int) -> dict[str, Any]:
        self.buffers[buffer_id] = self.plane.allocate(buffer_id, nbytes)
        return {"ok": True}

    def op_expect(self, tid: str, regions: list[list[Any]]) -> dict[str, Any]:
        self.handles[tid] = self.plane.expect(tid, [region(r) for r in regions])
        return {"ok": True}

    def op_check(self, tid: str, timeout: float, items: list[list[Any]]) -> dict[str, Any]:
        reply = self.op_wait(tid, timeout)
        reply["match"] = all(
            np.array_equal(
                np.frombuffer(self.buffers[item[0]], np.uint8)[item[1] : item[1] + item[2]],
                pattern(item[2], item[3]),
            )
            for item in items
        )
        return reply

    def op_sleep(self, seconds: float) -> dict[str, Any]:
        time.sleep(seconds)
        return {"ok": True}

    def op_counters(self) -> dict[str, Any]:
        p = self.plane
        return {"sent": p.bytes_sent, "received": p.bytes_received, "seconds_sent": p.seconds_sent}

    def close(self) -> None:
        self.plane.close()


def answer_lines(agent: Any) -> None:
    """Say ready, then answer each JSON command on stdin with `agent.handle(cmd)` until "close"."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "close":
            break
        try:
            reply = agent.handle(cmd)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    agent.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    answer_lines(Agent(sys.argv[1], **json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")))


if __name__ == "__main__":
    main()
