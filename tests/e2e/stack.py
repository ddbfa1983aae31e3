"""Bring `epd-serve up` up as a user would (a real subprocess) and take it down cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def wait_until(condition, timeout: float, step: float = 0.1) -> bool:
    """Poll `condition` every `step` seconds until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_pids(control_address: str) -> list[int]:
    """Processes still running `serve` for this stack (found by their --gateway argument)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"serve" in cmd and control_address.encode() in cmd:
                pids.append(int(entry.name))
    return pids


class RunningStack:
    def __init__(self, proc: subprocess.Popen, port: int, control: str, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.control = control
        self.log = log
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.root = f"http://127.0.0.1:{port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.root}/metrics", timeout=10) as r:
            return r.read().decode()

    def gauge(self, name: str) -> dict[str, float]:
        out = {}
        for line in self.metrics().splitlines():
            if line.startswith(name + "{"):
                labels, value = line[len(name) :].rsplit(" ", 1)
                out[labels.split('instance="')[1].split('"')[0]] = float(value)
        return out

    def stage_pids(self) -> list[int]:
        return stage_pids(self.control)


@contextlib.contextmanager
def running_stack(
    model: Path, topology: str, tmp: Path, *extra: str, timeout: float = 120
) -> Iterator[RunningStack]:
    port, control_port = free_port(), free_port()
    log = tmp / f"up-{topology.replace(' ', '_')}.log"
    cmd = [
        sys.executable, "-m", "cli.main", "up", "--model", str(model), "--topology", topology,
        "--port", str(port), "--control-port", str(control_port), "--threads", "1",
        "--kv-cache-memory", "32", *extra,
    ]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    stack = RunningStack(proc, port, f"tcp://127.0.0.1:{control_port}", log)
    try:
        deadline = time.monotonic() + timeout
        while "EPD-Serve is up" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`epd-serve up` did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield stack
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
