"""`epd-serve health` against a real gateway and real `serve` processes started with the engine flags:
the check follows an instance's registration, and --kv-cache-memory reaches the pool in MiB."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cli.health import live_instances
from tests.e2e.stack import free_port


def epd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(epd("health", *args), capture_output=True, text=True, timeout=30)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def kv_blocks(root: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    out = {}
    for line in lines:
        if line.startswith("epd_kv_total_blocks{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('instance="')[1].split('"')[0]] = float(value)
    return out


def test_health_follows_registration_and_the_flags_reach_the_engine(tiny_qwen2_vl: Path, tmp_path: Path):
    port, control = free_port(), free_port()
    root = f"http://127.0.0.1:{port}"
    host = socket.gethostname()
    keys = str(tmp_path / "keys")
    assert subprocess.run(epd("keys", keys), capture_output=True, timeout=60).returncode == 0
    common = ["--roles", "EPD", "--gateway", f"tcp://127.0.0.1:{control}", "--model", str(tiny_qwen2_vl),
              "--threads", "1", "--keys", keys]  # fmt: skip
    commands = {
        "gateway": epd("gateway", "--model", str(tiny_qwen2_vl), "--port", str(port),
                       "--control-port", str(control), "--keys", keys),
        "small": epd("serve", *common, "--instance-id", "small-{hostname}", "--kv-cache-memory", "16",
                     "--gpu-memory-utilization", "0.5", "--attention-backend", "sdpa", "--enforce-eager",
                     "--device", "auto"),
        "auto": epd("serve", *common, "--instance-id", "auto-{hostname}"),
    }  # fmt: skip
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in commands}

    def registered(name: str) -> bool:
        assert procs[name].poll() is None, f"{name} exited:\n{logs[name].read_text()[-3000:]}"
        return health("--gateway", root, "--instance", f"{name}-{{hostname}}").returncode == 0

    try:
        with open(logs["gateway"], "w") as log:
            procs["gateway"] = subprocess.Popen(commands["gateway"], stdout=log, stderr=subprocess.STDOUT)
        assert wait_for(lambda: "answered 503" in health("--gateway", root).stderr, 30), logs["gateway"]
        alone = health("--gateway", f"{root}/v1")
        assert alone.returncode == 1 and "no live instance for stage(s)" in alone.stderr
        for name in ("small", "auto"):
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT)
        for name in ("small", "auto"):
            assert wait_for(lambda n=name: registered(n), 120), logs[name].read_text()[-3000:]
        assert health("--gateway", root).returncode == 0, "every stage has a live instance now"
        missing = health("--gateway", root, "--instance", "nobody")
        assert missing.returncode == 1 and "instance 'nobody' is not registered" in missing.stderr
        blocks = kv_blocks(root)
        small, auto = blocks[f"small-{host}"], blocks[f"auto-{host}"]
        assert 15 <= auto / small <= 17, (
            f"16 MiB against the 256 MiB of auto on cpu: {small} vs {auto} blocks"
        )
        procs["small"].send_signal(signal.SIGTERM)
        procs["small"].wait(timeout=30)
        gone = wait_for(
            lambda: health("--gateway", root, "--instance", "small-{hostname}").returncode == 1, 15
        )
        assert gone, "a stopped instance fails its health check once the gateway drops it"
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_live_instances_reads_the_instance_labels():
    text = (
        "# TYPE epd_stage_running gauge\n"
        'epd_stage_running{instance="decode-ab12"} 0\n'
        'epd_stage_queue_depth{stage="E",instance="encode-cd34"} 2\n'
        "epd_requests_total 7\n"
    )
    assert live_instances(text) == {"decode-ab12", "encode-cd34"}
