"""kill -9 of the gateway under a running `epd-serve up`, mid-stream: the cut stream ends at once (a
dropped connection: the one way a stream may end without an error event), `up` starts the gateway
again on the same ports, the stage processes (the same processes, not restarted) rejoin it by
themselves, free what the cut stream held, and answer as transformers does, as before the kill."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from tests.e2e.conftest import image_message
from tests.e2e.stack import free_port, stage_pids, wait_until

LONG = 3800  # tokens: a stream that runs for seconds on the tiny model
MAX_TOKENS = 16


def health_status(root: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def gateway_child(up_pid: int) -> int | None:
    """The pid of the `epd-serve gateway` child of `up` (found through /proc: its parent and argv)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if ppid == up_pid and argv[1:4] == [b"-m", b"cli.main", b"gateway"]:
                return int(entry.name)
    return None


def kv_blocks(root: str) -> tuple[dict[str, float], dict[str, float]]:
    """Free and total KV blocks of the decode instances, from the gateway's /metrics."""
    with urllib.request.urlopen(f"{root}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    out: tuple[dict[str, float], dict[str, float]] = ({}, {})
    for line in lines:
        for i, name in enumerate(("epd_kv_free_blocks{", "epd_kv_total_blocks{")):
            instance = line.split('instance="')[1].split('"')[0] if line.startswith(name) else ""
            if instance.startswith("d"):  # `up` names its instances by roles and index: d2
                out[i][instance] = float(line.rsplit(" ", 1)[1])
    return out


def test_stages_survive_a_killed_gateway_and_rejoin_its_successor(tiny_qwen2_vl, tmp_path, reference, images):
    expected = reference.answer(images[0], MAX_TOKENS)
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    # no --control-port: the one `up` picks must outlive the gateway
    cmd = [
        sys.executable, "-m", "cli.main", "up", "--model", str(tiny_qwen2_vl), "--topology", "E1 P1 D1",
        "--port", str(port), "--threads", "1", "--kv-cache-memory", "32",
    ]  # fmt: skip
    gateways: list[int] = []
    with open(log, "w") as f:
        up = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until(lambda: "EPD-Serve is up" in log.read_text() or up.poll() is not None, 120)
        assert up.poll() is None, log.read_text()[-4000:]
        control = re.search(r"stage control: (tcp://\S+)", log.read_text()).group(1)
        stages = sorted(stage_pids(control))
        gateway = gateway_child(up.pid)
        assert len(stages) == 3 and gateway is not None
        gateways.append(gateway)

        client = openai.OpenAI(base_url=f"{root}/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id

        def ask() -> str:
            reply = client.chat.completions.create(
                model=model, messages=image_message(images[0]), max_tokens=MAX_TOKENS, temperature=0
            )
            return reply.choices[0].message.content

        before = ask()
        assert before == expected

        progress, outcome = [0], []

        def stream() -> None:
            try:
                chunks = client.chat.completions.create(
                    model=model, messages=image_message(images[1]), max_tokens=LONG, stream=True,
                    temperature=0, extra_body={"ignore_eos": True},
                )  # fmt: skip
                for chunk in chunks:
                    progress[0] += 1
                    if chunk.choices and chunk.choices[0].finish_reason:
                        outcome.append(chunk.choices[0].finish_reason)
                outcome.append("ended")
            except Exception as exc:  # the connection drops with the gateway
                outcome.append(exc)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert wait_until(lambda: progress[0] > 20, 30), "the stream should be running"
        # (the figures come with heartbeats, every 0.5 s)
        assert wait_until(lambda: kv_blocks(root)[0] != kv_blocks(root)[1], 5), "it holds decode blocks"
        os.kill(gateway, signal.SIGKILL)
        killed_at = time.monotonic()
        reader.join(timeout=10)
        assert not reader.is_alive(), "the cut stream must end within 10 s"
        assert "length" not in outcome, f"the stream was cut, not finished: {outcome}"
        cut_after = time.monotonic() - killed_at
        print(f"the cut stream ended with {outcome!r} after {progress[0]} chunks")

        # `up` starts the gateway again on the same ports; the stages register with it by themselves
        assert wait_until(lambda: health_status(root) == 200, 30), log.read_text()[-4000:]
        back_after = time.monotonic() - killed_at
        successor = gateway_child(up.pid)
        assert successor not in (None, gateway)
        gateways.append(successor)
        assert "gateway process exited; started it again" in log.read_text()
        assert sorted(stage_pids(control)) == stages, "the stage processes survived, not restarted"
        # having been asked to register again, the decode instance dropped the cut stream's blocks
        assert wait_until(lambda: kv_blocks(root)[0] == kv_blocks(root)[1] != {}, 10), kv_blocks(root)

        assert ask() == before == expected
        print(f"stream cut after {cut_after:.2f} s, stack healthy again after {back_after:.2f} s")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert up.returncode == 0
    assert wait_until(lambda: not stage_pids(control), 5), "stage processes outlived `epd-serve up`"
    assert not [p for p in gateways if Path(f"/proc/{p}").exists()], "the gateway outlived `epd-serve up`"
