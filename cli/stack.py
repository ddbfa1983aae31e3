"""A whole stack in one object: the gateway, and stage processes as children.

The gateway runs in this process (`gateway_process` off: the benchmarks and tests, which bring
topologies up and down in one run and reach `stack.cluster` directly), or as a supervised child of its
own (`epd-serve up`: cli/gateway_process.py says why), restarted like the stages when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli.gateway_process import GatewayProcess, loopback_if_wildcard
from cli.placement import Placement, place
from common.log import get_logger
from common.stack_keys import ENV_DIR, ENV_PUBLIC, ENV_SECRET, StackKeys
from common.topology import Topology
from gateway.planner_config import PlannerConfig

log = get_logger("epd.up")


@dataclass(slots=True)
class StackConfig:
    model_dir: str
    topology: Topology | None  # None: the gateway alone; stage processes join by themselves
    dataplane: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    control_port: int = 0
    control_host: str = ""  # default: host (127.0.0.1 when host is a wildcard)
    device: str = "cpu"
    dtype: str | None = None
    kv_cache_memory: int | None = None  # MiB per process; None: sized from the device (256 MiB on cpu)
    gpu_memory_utilization: float = 0.9  # share of each device, split among the processes placed on it
    attention_backend: str = "auto"
    enforce_eager: bool = False
    kv_staging: str = "auto"  # auto, on, off: see cli/engine_options.py
    devices: list[int] | None = None  # device indices, round-robin in topology order; None: [0]
    devices_for: list[tuple[str, list[int]]] = field(default_factory=list)  # (roles, indices)
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV per process; 0: never swap
    enable_prefix_caching: bool = True
    encoder_dtype: str = "auto"
    encoder_batch_tokens: int = 8192
    linear_backend: str = "auto"  # CPU linear layers: auto, onednn, torch (services/models/packed_linear.py)
    encoder_thread: str = "auto"  # E next to P: the encoder call on its own thread (auto, on, off)
    threads: int = 1
    cpus: list[str] = field(default_factory=list)  # per process, in topology order
    allowed_local_media_dirs: list[str] = field(default_factory=list)
    ready_timeout: float = 180.0
    restart: bool = True
    # The stack's CurveZMQ keys, handed to its stage processes through their environment. None with
    # `insecure`: nobody is authenticated; None otherwise: a fresh pair for this stack.
    keys: StackKeys | None = None
    insecure: bool = False
    api_key: str | None = None  # clients must send it as a Bearer token on /v1 routes
    gateway_process: bool = False  # the gateway as a supervised child (`up`), not in this process
    banner: bool = True  # serve_forever prints where to send requests (off: a supervisor prints it)
    planner: PlannerConfig = field(default_factory=PlannerConfig)  # gateway/planner.py; default off

    def __post_init__(self) -> None:
        if self.keys is None and not self.insecure:
            self.keys = StackKeys.generate()
        if self.gateway_process and self.topology is None:
            raise ValueError("a gateway child is started for a topology (the gateway alone runs here)")


def build_tiny_model() -> str:
    """The built-in tiny model, built on first use in a child process (this one stays torch-free)."""
    code = "from services.models.tiny import ensure_tiny_model; print(ensure_tiny_model())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def model_max_len(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config", config)
    return int(text.get("max_position_embeddings") or config.get("max_position_embeddings") or 4096)


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux: SIGTERM when the parent dies, even by kill -9
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.children: list[subprocess.Popen | None] = []
        self.commands: list[list[str]] = []
        # checked before anything starts: a bad device list is a usage error, not a crashed child
        self.placements: list[Placement] = (
            []
            if config.topology is None
            else place(
                config.topology.processes(), config.device, config.devices, config.devices_for, os.environ
            )
        )
        # per child: this environment, its visible-devices variable and the stack's keys
        self.envs = [{**os.environ, **p.env, **self._key_env()} for p in self.placements]
        self.cluster = None
        self.runner = None
        self.gateway: GatewayProcess | None = None  # with `gateway_process`
        self.stopping = False
        self._supervisor: asyncio.Task | None = None

    def _key_env(self) -> dict[str, str]:
        """How a child finds the stack's keys (it reads them before anything else)."""
        keys = self.config.keys
        if keys is None:
            return {"EPD_INSECURE": "1"}
        public, secret = keys.public.decode(), keys.secret.decode()
        return {ENV_PUBLIC: public, ENV_SECRET: secret, ENV_DIR: "", "EPD_INSECURE": ""}

    @property
    def control_host(self) -> str:
        c = self.config
        return c.control_host or loopback_if_wildcard(c.host)

    @property
    def control_address(self) -> str:
        """Where stage processes register (the in-process cluster's bound endpoint, or the child's)."""
        if self.gateway is not None:
            return self.gateway.control_address
        return self.cluster.address if self.cluster is not None else ""

    @property
    def port(self) -> int:
        return self.gateway.port if self.gateway is not None else self.config.port

    def gateway_child(self) -> GatewayProcess:
        """The gateway child of this stack, its ports fixed now: every restart binds the same ones."""
        return GatewayProcess.for_stack(
            self.config, self.control_host, self._key_env(),
            spawn=lambda cmd, env: subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent),  # noqa: PLW1509
        )  # fmt: skip

    def serve_command(self, index: int, roles: str, gateway: str) -> list[str]:
        """The `epd-serve serve` command of process `index` (its device comes from its placement)."""
        c = self.config
        where = self.placements[index]
        share = c.gpu_memory_utilization / where.sharing
        cmd = [
            sys.executable, "-m", "cli.main", "serve", "--roles", roles, "--gateway", gateway,
            "--model", c.model_dir, "--dataplane", c.dataplane, "--device", where.device,
            "--bind-host", c.host if c.host not in ("0.0.0.0", "::") else "127.0.0.1",
            "--kv-cache-memory", "auto" if c.kv_cache_memory is None else str(c.kv_cache_memory),
            "--gpu-memory-utilization", f"{share:.6g}", "--attention-backend", c.attention_backend,
            "--max-num-seqs", str(c.max_num_seqs), "--max-num-batched-tokens", str(c.max_num_batched_tokens),
            "--swap-space", f"{c.swap_space:g}",
            "--threads", str(c.threads), "--instance-id", f"{roles.lower()}{index}",
        ]  # fmt: skip
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        if not c.enable_prefix_caching:
            cmd.append("--no-enable-prefix-caching")
        if "E" in roles:
            cmd += ["--encoder-batch-tokens", str(c.encoder_batch_tokens)]
            if c.encoder_dtype != "auto":
                cmd += ["--encoder-dtype", c.encoder_dtype]
            if c.encoder_thread != "auto":
                cmd += ["--encoder-thread", c.encoder_thread]
        if c.kv_staging != "auto":
            cmd += ["--kv-staging", c.kv_staging]
        if c.linear_backend != "auto":
            cmd += ["--linear-backend", c.linear_backend]
        if c.dtype:
            cmd += ["--dtype", c.dtype]
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if index < len(c.cpus):
            cmd += ["--cpus", c.cpus[index]]
        return cmd

    async def start(self, http: bool = True) -> None:
        """Start the cluster and the stage processes; with `http`, the OpenAI gateway too. With
        `gateway_process` the gateway is a child, started (and answering) before the stages."""
        c = self.config
        if c.gateway_process:
            self.gateway = self.gateway_child()
            self.gateway.start()
            await self.gateway.wait_answering(c.ready_timeout)
            return await self._start_stages()
        from gateway.cluster import Cluster

        max_len = c.max_model_len or model_max_len(c.model_dir)
        self.cluster = Cluster(
            Path(c.model_dir).resolve().name,
            max_len,
            f"tcp://{self.control_host}:{c.control_port or '*'}",
            keys=c.keys,
            planner=c.planner,
        )
        await self.cluster.start()
        if c.topology is not None:
            await self._start_stages()
        if not http:
            return
        from common.tokenizer import TextTokenizer
        from gateway.app import create_app, start_site
        from gateway.config import GatewayConfig

        tokenizer = TextTokenizer.from_dir(c.model_dir)
        gw_config = GatewayConfig(
            model_dir=Path(c.model_dir), host=c.host, port=c.port,
            allowed_local_media_dirs=[Path(d) for d in c.allowed_local_media_dirs], api_key=c.api_key,
        )  # fmt: skip
        self.runner = await start_site(create_app(gw_config, self.cluster, tokenizer), c.host, c.port)

    async def _start_stages(self) -> None:
        c = self.config
        backend = self.gateway or self.cluster
        assert backend is not None and c.topology is not None
        for i, roles in enumerate(c.topology.processes()):
            where = self.placements[i]
            self.commands.append(self.serve_command(i, roles, self.control_address))
            log.info("placing stage process", index=i, roles=roles, on=where.describe())
            self.children.append(self._spawn(i))
        t0 = time.monotonic()
        ready = asyncio.create_task(backend.wait_for(c.topology.role_counts(), c.ready_timeout))
        while not ready.done():
            await asyncio.sleep(0.1)
            dead = [i for i, p in enumerate(self.children) if p is not None and p.poll() is not None]
            if dead:
                ready.cancel()
                raise RuntimeError(f"stage process {self.commands[dead[0]][5]} exited during start-up")
            code = self.gateway.exit_code() if self.gateway is not None else None
            if code is not None:
                ready.cancel()
                raise RuntimeError(f"the gateway process exited during start-up (exit code {code})")
        if not ready.result():
            raise RuntimeError(f"not every instance registered within {c.ready_timeout:.0f} s")
        self._supervisor = asyncio.create_task(self._supervise())
        log.info("stages ready", topology=str(c.topology), seconds=round(time.monotonic() - t0, 1))

    def _spawn(self, index: int) -> subprocess.Popen:
        cmd, env = self.commands[index], self.envs[index]
        return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509

    async def _supervise(self) -> None:
        """Start again whatever exited (unless stopping): stages rejoin the gateway by registering,
        a restarted gateway is rejoined by the stages (their heartbeats are answered "register again")."""
        while True:
            await asyncio.sleep(0.5)
            if self.stopping or not self.config.restart:
                continue
            for i, p in enumerate(self.children):
                if p is not None and p.poll() == 0:  # it left on purpose (drained, or stopped)
                    log.info("stage process left the stack", index=i)
                    self.children[i] = None
                elif p is not None and p.poll() is not None:
                    log.warning("stage process exited; starting it again", index=i, code=p.returncode)
                    self.children[i] = self._spawn(i)
            code = self.gateway.restart_if_exited() if self.gateway is not None else None
            if code is not None:
                log.warning("gateway process exited; started it again on the same ports", code=code)

    async def stop(self) -> None:
        self.stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.gateway is not None:
            self.gateway.terminate()
        for p in self.children:
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in [*self.children, self.gateway.proc if self.gateway is not None else None]:
            if p is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.cluster is not None:
            await self.cluster.close()

    async def serve_forever(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # nothing is restarted once a stop is asked for
            loop.add_signal_handler(sig, lambda: (setattr(self, "stopping", True), stop.set()))
        try:
            await self.start()
        except Exception as exc:
            print(f"epd-serve up: error: {exc}", file=sys.stderr)
            await self.stop()
            return 1
        c, port = self.config, self.port
        url = f"http://{c.host}:{port}/v1"
        if c.banner:
            print(
                f"EPD-Serve is up: topology {c.topology or 'none yet (instances join)'}, model {Path(c.model_dir).name}\n"
                f"  OpenAI API:   {url}   (model name: {Path(c.model_dir).resolve().name})\n"
                f"  health:       http://{c.host}:{port}/health   metrics: http://{c.host}:{port}/metrics\n"
                f"  stage control: {self.control_address}   (epd-serve serve --gateway ... adds instances)\n"
                f"Press Ctrl-C to stop.",
                flush=True,
            )
        await stop.wait()
        await self.stop()
        return 0
