"""What the benchmark talks to: a server already running, or topologies it brings up one by one.

Bringing topologies up here (gateway in this process, stage processes as children, via `cli.stack`)
is what makes "compare topologies side by side in one run" honest: same machine, same model, same
workload, minutes apart, and each topology is torn down before the next starts, so none competes
with another for the cores. Stage processes do not restart in a benchmark: a crash must show up as
failed requests, not be hidden by a fresh process.

Only loopback addresses are targeted unless the caller allows others: a load generator pointed at
someone else's server by a typo is a denial of service.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

from gateway.planner_config import PlannerConfig


@dataclass(slots=True)
class Server:
    """A live OpenAI-compatible endpoint; `stack` is set when this run started it."""

    name: str  # the topology, or the URL of an external server
    base_url: str  # ends in /v1
    model: str = ""
    stack: Any = None  # cli.stack.Stack

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def exited_stages(self) -> list[str]:
        """Stage processes of our stack that are no longer running, as 'ROLES (exit CODE)'."""
        if self.stack is None:
            return []
        out = []
        for cmd, proc in zip(self.stack.commands, self.stack.children, strict=False):
            if proc is not None and proc.poll() is not None:
                out.append(f"{cmd[cmd.index('--roles') + 1]} (exit {proc.returncode})")
        return out


@dataclass(slots=True)
class StackOptions:
    """How to start each topology; mirrors `epd-serve up`."""

    model_dir: str
    dataplane: str = "auto"
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None  # per process; None: cores / processes
    cpus: list[str] = field(default_factory=list)  # per process, in topology order
    pin: bool = False  # round-robin cores per process when cpus is empty
    kv_cache_memory: int | None = None  # MiB per process; None: sized from the device
    gpu_memory_utilization: float = 0.9  # of each device, split among the processes placed on it
    attention_backend: str = "auto"
    enforce_eager: bool = False
    kv_staging: str = "auto"  # decode processes: auto, on, off
    devices: list[int] | None = None  # accelerator indices, round-robin; None: [0]
    devices_for: list[tuple[str, list[int]]] = field(default_factory=list)  # (roles, indices)
    max_num_seqs: int = 64
    swap_space: float = 4.0  # GiB per process
    enable_prefix_caching: bool = True
    encoder_dtype: str = "auto"
    encoder_batch_tokens: int = 8192
    linear_backend: str = "auto"
    encoder_thread: str = "auto"
    ready_timeout: float = 180.0
    planner: PlannerConfig = field(default_factory=PlannerConfig)  # the gateway's role planner; off


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(family: str = "qwen2_vl", preset: str = "small") -> str:
    """The cached offline checkpoint of `family`/`preset`, built on first use in a child process, so
    this process (which hosts the gateway) never imports torch."""
    code = (
        "import sys; from services.models.tiny import ensure_tiny_model; "
        "print(ensure_tiny_model(sys.argv[1], sys.argv[2]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, family, preset], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model the server lists at /v1/models."""
    async with session.get(base_url.rstrip("/") + "/models", timeout=aiohttp.ClientTimeout(30)) as r:
        r.raise_for_status()
        models = (await r.json()).get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/models lists no model; pass --model")
    return str(models[0]["id"])


def _cpus_for(options: StackOptions, processes: int) -> list[str]:
    if options.cpus or not options.pin:
        return list(options.cpus)
    cores = os.cpu_count() or 1
    per = max(1, cores // processes)
    return [",".join(str((i * per + k) % cores) for k in range(per)) for i in range(processes)]


def applicable(devices_for: list[tuple[str, list[int]]], processes: list[str]) -> list[tuple[str, list[int]]]:
    """The --devices-for lists that name processes of this topology (a run compares several)."""
    return [(roles, devices) for roles, devices in devices_for if roles in processes]


@contextlib.asynccontextmanager
async def topology_server(topology: str, options: StackOptions) -> AsyncIterator[Server]:
    """Start `topology` on a free loopback port, yield it, stop it (always, even on errors)."""
    from cli.stack import Stack, StackConfig  # the gateway side: torch-free
    from common.topology import parse_topology

    topo = parse_topology(topology)
    n = topo.num_processes
    port = free_port()
    config = StackConfig(
        model_dir=options.model_dir, topology=topo, dataplane=options.dataplane, host="127.0.0.1",
        port=port, device=options.device, dtype=options.dtype, kv_cache_memory=options.kv_cache_memory,
        gpu_memory_utilization=options.gpu_memory_utilization, attention_backend=options.attention_backend,
        enforce_eager=options.enforce_eager, kv_staging=options.kv_staging, devices=options.devices,
        devices_for=applicable(options.devices_for, topo.processes()),
        max_num_seqs=options.max_num_seqs, swap_space=options.swap_space,
        enable_prefix_caching=options.enable_prefix_caching, encoder_dtype=options.encoder_dtype,
        encoder_batch_tokens=options.encoder_batch_tokens, linear_backend=options.linear_backend, encoder_thread=options.encoder_thread, threads=options.threads or max(1, (os.cpu_count() or 1) // n),
        cpus=_cpus_for(options, n), ready_timeout=options.ready_timeout, restart=False, planner=options.planner,
    )  # fmt: skip
    stack = Stack(config)
    try:
        await stack.start()
        yield Server(name=str(topo), base_url=f"http://127.0.0.1:{port}/v1", stack=stack)
    finally:
        await stack.stop()
