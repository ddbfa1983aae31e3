"""Reading the compose files as Docker would, and turning them into local processes.

No Docker engine runs here, so the tests do what compose does themselves: interpolate `${VAR:-default}`,
merge an override file into a stack (mappings key by key, everything else replaced), and run each
service's command (and health check) with service names as loopback, fixed ports as free ones,
/models as the folder holding the model, and `{hostname}` as a name of each replica's own, as each
container has its own host name.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.stack_keys import StackKeys
from tests.e2e.stack import free_port

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
STACKS = ["epd.yaml", "ep-d.yaml", "scaled.yaml", "monolithic.yaml"]
OVERRIDES = {  # GPU override -> the stacks it goes over (service names must match)
    "gpu.yaml": ["epd.yaml", "scaled.yaml"],
    "gpu-ep-d.yaml": ["ep-d.yaml"],
    "gpu-monolithic.yaml": ["monolithic.yaml"],
}
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets", "version"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "volumes", "ports", "depends_on", "restart",
    "deploy", "profiles", "healthcheck", "ipc", "shm_size", "networks", "expose", "labels", "runtime",
}  # fmt: skip
HEALTH_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merge(base: dict, override: dict) -> dict:
    """compose's merge of `-f base -f override`: mappings merge key by key, other values are replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def stage_services(doc: dict) -> dict[str, dict]:
    """The services that run `serve` (stage processes), setup and client profiles left out."""
    return {
        name: svc
        for name, svc in doc["services"].items()
        if svc["command"][0] == "serve" and "profiles" not in svc
    }


def health_test(svc: dict) -> list[str]:
    return svc["healthcheck"]["test"]


def dependencies(svc: dict) -> dict[str, str]:
    """depends_on in either form, as {service: condition}."""
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def assert_valid_stack(doc: dict, label: str) -> None:
    assert set(doc) - {k for k in doc if k.startswith("x-")} <= TOP_LEVEL, label
    services = doc["services"]
    assert "gateway" in services, label
    roles = set()
    for name, svc in services.items():
        where = f"{label}: {name}"
        assert set(svc) <= SERVICE_KEYS, f"{where}: unknown keys {set(svc) - SERVICE_KEYS}"
        assert "image" in svc or "build" in svc, f"{where} has neither image nor build"
        cmd = svc["command"]
        assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), where
        for dep, condition in dependencies(svc).items():
            assert dep in services, f"{where} depends on unknown service {dep}"
            assert condition in CONDITIONS, f"{where}: unknown condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{where} waits for {dep} to be healthy: it has no check"
                )
        if cmd[0] in ("gateway", "serve", "make-tiny-model"):
            assert any(str(v).endswith((":/models:ro", ":/models")) for v in svc["volumes"]), where
        replicas = svc.get("deploy", {}).get("replicas", 1)
        assert isinstance(replicas, int) and replicas >= 1, where
        if cmd[0] in ("gateway", "serve"):
            assert set(svc["healthcheck"]) <= HEALTH_KEYS, where
            test = health_test(svc)
            assert test[:3] == ["CMD", "epd-serve", "health"], (
                f"{where}: the health check is epd-serve health"
            )
        if cmd[0] == "serve" and "profiles" not in svc:
            assert cmd[cmd.index("--gateway") + 1] == "tcp://gateway:5555", "stages find the gateway by name"
            assert "ports" not in svc, "stage instances publish no fixed port, so they can be scaled"
            instance = cmd[cmd.index("--instance-id") + 1]
            assert "{hostname}" in instance, f"{where}: replicas need ids of their own"
            assert test[test.index("--instance") + 1] == instance, f"{where} checks its own instance"
            assert test[test.index("--gateway") + 1] == "http://gateway:8000"
            # the gateway is healthy only once the stages have joined: waiting for that would deadlock
            assert dependencies(svc).get("gateway") == "service_started", where
            roles |= set(cmd[cmd.index("--roles") + 1])
    gateway = services["gateway"]
    assert (
        gateway["command"][0] == "gateway"
        and gateway["command"][gateway["command"].index("--control-port") + 1] == "5555"
    )
    assert health_test(gateway)[3:] == ["--gateway", "http://127.0.0.1:8000"], "the gateway checks /health"
    assert roles == set("EPD"), f"{label} leaves a stage without an instance"


@dataclass
class Replica:
    service: str
    command: list[str]  # runnable here
    health: list[str]  # the health check's `test`, translated the same way


@dataclass
class LocalStack:
    port: int
    env: dict[str, str]
    replicas: list[Replica] = field(default_factory=list)
    clients: list[list[str]] = field(default_factory=list)  # profile services that talk to the gateway


def command_of(test: list[str]) -> list[str]:
    """A health check's `["CMD", "epd-serve", ...]` as a command here."""
    assert test[:2] == ["CMD", "epd-serve"], test
    return [sys.executable, "-m", "cli.main", *test[2:]]


def local_processes(
    path: Path, model_dir: Path, scale: dict[str, int], settings: dict[str, str]
) -> LocalStack:
    doc = load(path)
    port, control = free_port(), free_port()
    # cpu stacks here (EPD_DEVICE=auto would pick a GPU on a GPU host); `settings` as a user exports them
    env = {**os.environ, "EPD_MODEL": model_dir.name, "EPD_PORT": str(port), "EPD_DEVICE": "cpu",
           "EPD_LOG_JSON": "1", **settings}  # fmt: skip

    keys = tempfile.mkdtemp(prefix="epd-keys-")  # what the make-keys service writes into ./keys
    StackKeys.generate().write(keys)

    def local(args: list[str], hostname: str) -> list[str]:
        out = []
        for a in args:
            if a == "/keys":
                out.append(keys)
                continue
            a = (
                interpolate(a, env)
                .replace("/models/", f"{model_dir.parent}/")
                .replace("{hostname}", hostname)
            )
            a = a.replace("tcp://gateway:5555", f"tcp://127.0.0.1:{control}")
            a = a.replace("http://gateway:8000", f"http://127.0.0.1:{port}")
            a = a.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
            out.append("127.0.0.1" if a == "0.0.0.0" else a)
        return out

    stack = LocalStack(port, env)
    for name, svc in doc["services"].items():
        if "setup" in svc.get("profiles", []):
            continue
        if "profiles" in svc:
            stack.clients.append([sys.executable, "-m", "cli.main", *local(svc["command"], name)])
            continue
        for k in range(scale.get(name, svc.get("deploy", {}).get("replicas", 1))):
            hostname = f"{name}-replica{k}"  # what Docker's container host name is to a replica
            cmd = local(svc["command"], hostname)
            if name == "gateway":
                cmd[cmd.index("--port") + 1] = str(port)
                cmd[cmd.index("--control-port") + 1] = str(control)
            health = local(svc["healthcheck"]["test"], hostname)
            stack.replicas.append(Replica(name, [sys.executable, "-m", "cli.main", *cmd], health))
    stack.replicas.sort(key=lambda r: r.service != "gateway")
    return stack


def instance_counts(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())["stages"]["instances"]


def wait_healthy(port: int, timeout: float, status: int = 200) -> bool:
    """Wait until /health answers `status` (200: every stage has an instance; 503: the gateway alone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == status:
                    return True
        except urllib.error.HTTPError as exc:
            if exc.code == status:
                return True
        except OSError:
            pass
        time.sleep(0.3)
    return False
