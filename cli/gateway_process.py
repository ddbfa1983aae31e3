"""The gateway as a supervised child of `epd-serve up`, restarted like a stage process when it exits.

Why a child and not a part of `up`: a gateway that dies (a crash, an out-of-memory kill) would take
`up`, and with it every stage process, down; loading the stages again takes far longer than starting
a gateway. As a child it comes back on the same HTTP and control ports with the same keys (ports are
fixed before the first start, never "any free port", so the stages' connections find it again). The
stage processes keep running: their ZeroMQ connections reconnect by themselves, the new gateway does
not know them and answers their next heartbeat with "register again", and they rejoin after dropping
what they held (services/host.py). A stream open when the gateway died is cut: the client sees its
connection drop, the one case where a stream ends without an error event.

The child is `epd-serve gateway`, exactly what a container deployment runs. The stack's keys and the
API key reach it through its environment, as the stages get theirs, never on its command line
(which every user of the machine can read). Standard library only: `up` stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

from cli.key_options import ENV_API_KEY
from cli.planner_options import planner_argv

if TYPE_CHECKING:
    from cli.stack import StackConfig

WILDCARDS = ("0.0.0.0", "::", "")
# /health is asked directly: an HTTP(S)_PROXY of the environment must not route loopback elsewhere
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def loopback_if_wildcard(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard: through loopback)."""
    return "127.0.0.1" if host in WILDCARDS else host


def health_url(host: str, port: int) -> str:
    host = loopback_if_wildcard(host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/health"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, to keep for every start of the gateway."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def gateway_command(config: StackConfig, port: int, control_host: str, control_port: int) -> list[str]:
    """The `epd-serve gateway` command of a stack."""
    cmd = [
        sys.executable, "-m", "cli.main", "gateway", "--model", config.model_dir,
        "--host", config.host, "--port", str(port),
        "--control-host", control_host, "--control-port", str(control_port), "--no-banner",
    ]  # fmt: skip
    if config.max_model_len:
        cmd += ["--max-model-len", str(config.max_model_len)]
    for folder in config.allowed_local_media_dirs:
        cmd += ["--allowed-local-media-path", str(folder)]
    return cmd + planner_argv(config.planner)


def gateway_env(base: dict[str, str], key_env: dict[str, str], api_key: str | None) -> dict[str, str]:
    """The child's environment: `base`, the stack's keys as the stages get them, and the API key
    (set to empty when the stack has none, so that one in `base` cannot switch a check on)."""
    return {**base, **key_env, ENV_API_KEY: api_key or ""}


def read_health(url: str, timeout: float = 2.0) -> dict | None:
    """The JSON body of the gateway's /health, whatever its status (503 until every stage has a live
    instance); None while nothing answers there."""
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError, OSError):
            return json.loads(exc.read())
        return {}
    except (OSError, ValueError):
        return None


class GatewayProcess:
    """One gateway child: its command and environment stay the same over every restart."""

    def __init__(
        self, command: list[str], env: dict[str, str], health_url: str, *, port: int,
        control_address: str, spawn: Callable[[list[str], dict[str, str]], subprocess.Popen],
    ) -> None:  # fmt: skip
        self.command = command
        self.env = env
        self.health_url = health_url
        self.port = port  # HTTP
        self.control_address = control_address  # where the stages register, tcp://HOST:PORT
        self._spawn = spawn  # the stack's: the child must die with `up`, even on kill -9
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @classmethod
    def for_stack(
        cls, config: StackConfig, control_host: str, key_env: dict[str, str], *,
        spawn: Callable[[list[str], dict[str, str]], subprocess.Popen],
    ) -> GatewayProcess:  # fmt: skip
        """A stack's gateway: a port left to 0 (any free one) is picked now, once."""
        port = config.port or free_port(loopback_if_wildcard(config.host))
        control_port = config.control_port or free_port(control_host)
        return cls(
            gateway_command(config, port, control_host, control_port),
            gateway_env(dict(os.environ), key_env, config.api_key),
            health_url(config.host, port),
            port=port, control_address=f"tcp://{control_host}:{control_port}", spawn=spawn,
        )  # fmt: skip

    def start(self) -> None:
        self.proc = self._spawn(self.command, self.env)

    def exit_code(self) -> int | None:
        """Its exit status once it has exited; None while it runs (or before it started)."""
        return None if self.proc is None else self.proc.poll()

    def restart_if_exited(self) -> int | None:
        """Start it again when it has exited; returns the exit status it had, else None."""
        code = self.exit_code()
        if code is not None:
            self.restarts += 1
            self.start()
        return code

    async def health(self) -> dict | None:
        return await asyncio.to_thread(read_health, self.health_url)

    async def wait_answering(self, timeout: float) -> None:
        """Until its HTTP server answers /health (any status); raises when it exits or the time is up."""
        deadline = time.monotonic() + timeout
        while await self.health() is None:
            code = self.exit_code()
            if code is not None:
                raise RuntimeError(f"the gateway process exited during start-up (exit code {code})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    async def wait_for(self, counts: dict[str, int], timeout: float) -> bool:
        """Wait until its /health counts at least `counts[role]` live instances of each role."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = await self.health() or {}
            have = (body.get("stages") or {}).get("instances") or {}
            if all(int(have.get(r, 0)) >= n for r, n in counts.items()):
                return True
            await asyncio.sleep(0.2)
        return False

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
