"""A device data plane in a child process that sees one GPU, as a stack's child does (device_peer.py)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).parent / "device_peer.py"
MiB = 1 << 20


def sees_only(index: int) -> dict[str, str]:
    """This environment with CUDA_VISIBLE_DEVICES narrowed to our device `index`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {**os.environ, "CUDA_VISIBLE_DEVICES": entries[index].strip(), "PYTHONPATH": str(REPO)}


class GpuPeer:
    """A `backend` plane on `cuda` in a child process; `call` sends one command, returns its reply."""

    def __init__(self, env: dict[str, str], backend: str = "torchdist", **options: Any) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), backend, "cuda", json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, cwd=REPO,
        )  # fmt: skip
        assert self._read(120) == {"ready": True}

    def call(self, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout)
        assert "error" not in reply, f"peer failed on {op}: {reply['error']}"
        return reply

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self._stderr.seek(0)
            log = self._stderr.read().decode(errors="replace")[-4000:]
            raise AssertionError(f"the GPU peer gave no reply in {timeout} s; its stderr:\n{log}")
        return json.loads(line)

    def __enter__(self) -> GpuPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "close"}\n')
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()
