"""The compose stacks: each file is valid compose, and the very commands it names, run as local
processes with the same environment, bring a stack up that answers a request (no Docker engine here)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from tests.e2e.conftest import image_message
from tests.e2e.stack import free_port
from tests.reference import make_image

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
FILES = sorted(COMPOSE.glob("*.yaml"))
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets", "version"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "volumes", "ports", "depends_on", "restart",
    "deploy", "profiles", "healthcheck", "ipc", "shm_size", "networks", "expose", "labels", "runtime",
}  # fmt: skip
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_the_four_stacks_and_a_dockerfile():
    assert {f.name for f in FILES} == {"epd.yaml", "ep-d.yaml", "scaled.yaml", "monolithic.yaml"}
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert "ARG BASE=" in dockerfile and 'ENTRYPOINT ["epd-serve"]' in dockerfile


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_compose_file_is_valid(path):
    doc = load(path)
    assert set(doc) - {k for k in doc if k.startswith("x-")} <= TOP_LEVEL
    services = doc["services"]
    assert "gateway" in services
    roles = set()
    for name, svc in services.items():
        assert set(svc) <= SERVICE_KEYS, f"{name}: unknown keys {set(svc) - SERVICE_KEYS}"
        assert "image" in svc or "build" in svc, f"{name} has neither image nor build"
        assert isinstance(svc["command"], list) and all(isinstance(a, str) for a in svc["command"])
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        assert any(str(v).endswith(":/models:ro") or str(v).endswith(":/models") for v in svc["volumes"])
        replicas = svc.get("deploy", {}).get("replicas", 1)
        assert isinstance(replicas, int) and replicas >= 1
        cmd = svc["command"]
        if cmd[0] == "serve":
            assert cmd[cmd.index("--gateway") + 1] == "tcp://gateway:5555", "stages find the gateway by name"
            assert "ports" not in svc, "stage instances publish no fixed port, so they can be scaled"
            if "setup" not in svc.get("profiles", []):
                roles |= set(cmd[cmd.index("--roles") + 1])
    gateway = services["gateway"]["command"]
    assert gateway[0] == "gateway" and gateway[gateway.index("--control-port") + 1] == "5555"
    assert roles == set("EPD"), f"{path.name} leaves a stage without an instance"


def local_processes(path: Path, model_dir: Path, scale: dict[str, int]) -> tuple[list[list[str]], int, dict]:
    """The compose file's commands as local processes: service names become loopback, fixed ports
    free ones, /models the folder holding the model."""
    doc = load(path)
    port, control = free_port(), free_port()
    env = {**os.environ, "EPD_MODEL": model_dir.name, "EPD_PORT": str(port)}
    commands = []
    for name, svc in doc["services"].items():
        if "profiles" in svc:
            continue
        count = scale.get(name, svc.get("deploy", {}).get("replicas", 1))
        cmd = [interpolate(a, env) for a in svc["command"]]
        cmd = [
            a.replace("/models/", f"{model_dir.parent}/").replace(
                "tcp://gateway:5555", f"tcp://127.0.0.1:{control}"
            )
            for a in cmd
        ]
        cmd = ["127.0.0.1" if a == "0.0.0.0" else a for a in cmd]
        if name == "gateway":
            cmd[cmd.index("--port") + 1] = str(port)
            cmd[cmd.index("--control-port") + 1] = str(control)
        commands += [[sys.executable, "-m", "cli.main", *cmd] for _ in range(count)]
    return commands, port, env


def instance_counts(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())["stages"]["instances"]


def wait_healthy(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


@pytest.mark.parametrize(
    ("name", "scale", "instances"),
    [
        ("epd.yaml", {"decode": 2}, {"E": 1, "P": 1, "D": 2}),  # docker compose up --scale decode=2
        ("ep-d.yaml", {}, {"E": 1, "P": 1, "D": 1}),
        ("scaled.yaml", {}, {"E": 2, "P": 1, "D": 2}),
        ("monolithic.yaml", {}, {"E": 1, "P": 1, "D": 1}),
    ],
)
def test_compose_commands_bring_up_a_serving_stack(name, scale, instances, tiny_qwen2_vl, tmp_path):
    commands, port, env = local_processes(COMPOSE / name, tiny_qwen2_vl, scale)
    env["EPD_LOG_JSON"] = "1"
    procs = []
    for i, c in enumerate(commands):
        with open(tmp_path / f"{i}.log", "w") as log:
            procs.append(subprocess.Popen(c, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        assert wait_healthy(port, 90), (tmp_path / "0.log").read_text()[-3000:]
        deadline = time.monotonic() + 60
        while instance_counts(port) != instances and time.monotonic() < deadline:
            time.sleep(0.3)
        assert instance_counts(port) == instances, "every replica registers itself"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
        )
        reply = client.chat.completions.create(
            model=tiny_qwen2_vl.name, messages=image_message(make_image(84, 84)), max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
