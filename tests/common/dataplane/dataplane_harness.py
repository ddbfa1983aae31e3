"""Peers for the data-plane suite: planes in other processes, driven by JSON lines.

Producers are real processes (`dataplane_peer.py`) except for the in-process fake backend, whose peers
run the same agent in this process. Only plain JSON crosses between the processes.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from dataplane_peer import Agent  # noqa: E402

PEER_SCRIPT = Path(__file__).parent / "dataplane_peer.py"


class RemotePeer:
    """A producer/consumer plane in a child process; `call` sends one command and waits for its reply."""

    def __init__(
        self,
        backend: str,
        options: dict[str, Any] | None = None,
        *,
        args: list[str] | None = None,
        script: Path = PEER_SCRIPT,
        env: dict[str, str] | None = None,
    ) -> None:
        """`script BACKEND [ARGS...] OPTIONS_JSON` in a child (tests/gpu passes its own script and the
        environment that leaves the child one GPU)."""
        self.backend = backend
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        self._stderr_tail = ""
        self.proc = subprocess.Popen(
            [sys.executable, str(script), backend, *(args or []), json.dumps(options or {})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def ready(self, timeout: float = 60) -> RemotePeer:
        assert self._read(timeout) == {"ready": True}
        return self

    def call(self, op: str, reply_timeout: float = 120, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(reply_timeout)
        assert "error" not in reply, f"peer failed on {op}: {reply['error']}"
        return reply

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(
                f"{self.backend} peer gave no reply in {timeout} s; stderr:\n{self.stderr()}"
            )
        return json.loads(line)

    def stderr(self) -> str:
        """The tail of the peer's log (kept after close)."""
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_tail = self._stderr.read().decode(errors="replace")[-4000:]
        return self._stderr_tail

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.stderr()
        self._stderr.close()

    def __enter__(self) -> RemotePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalPeer:
    """The same agent in this process, for the fake backend (which cannot cross processes)."""

    def __init__(self, backend: str, options: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.agent = Agent(backend, **(options or {}))

    def call(self, op: str, reply_timeout: float = 120, **args: Any) -> dict[str, Any]:
        return self.agent.handle({"op": op, **args})

    def close(self) -> None:
        self.agent.close()


Peer = RemotePeer | LocalPeer


def start_peers(backend: str, count: int, options: dict[str, Any] | None = None) -> list[Peer]:
    if backend == "fake":
        return [LocalPeer(backend, options) for _ in range(count)]
    peers = [RemotePeer(backend, options) for _ in range(count)]
    return [peer.ready() for peer in peers]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def has_dev_shm() -> bool:
    return os.path.isdir("/dev/shm")
