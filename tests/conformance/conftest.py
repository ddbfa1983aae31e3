"""The conformance stack: the real gateway and the stage under test, as processes on loopback.

The gateway is the fixed side of the contract (docs/protocol.md): it is started exactly as a
deployment starts it (`python -m cli.main gateway`), with a fresh stack key pair handed over in the
environment, as `epd-serve up` hands it to its children. The stage under test is started from the
command template in EPD_CONFORMANCE_STAGE with the same environment, so it must find the keys where
our own stages do (EPD_STACK_PUBLIC_KEY / EPD_STACK_SECRET_KEY). The roles it does not host are
filled by our own `serve` processes.

One stack per module: loading torch in four processes on two cores is most of the suite's time, so
the stages boot while this process computes transformers' reference answers.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.stack_keys import ENV_DIR, ENV_PUBLIC, ENV_SECRET, StackKeys
from gateway.cluster import Cluster
from tests.e2e.stack import free_port

STAGE_ENV = "EPD_CONFORMANCE_STAGE"
ROLES_ENV = "EPD_CONFORMANCE_ROLES"
# Decode is the default: it speaks the most of the protocol (KvReserve, KvDest, the data plane,
# KvReady, Tokens, Abort) and its KV pool is visible in the gateway's /metrics.
DEFAULT_ROLES = "D"
STAGE_ID = "conformance-stage"
OUR_SERVE = f"{shlex.quote(sys.executable)} -m cli.main serve --threads 1 --kv-cache-memory 32"
DEFAULT_STAGE = (
    f"{OUR_SERVE} --roles {{roles}} --gateway {{gateway}} --model {{model}} --instance-id {{instance_id}}"
)
# the gateway's own figures (not flags of `epd-serve gateway`): what a stage must keep up with
_cluster_defaults = inspect.signature(Cluster.__init__).parameters
HEARTBEAT_TIMEOUT_S: float = _cluster_defaults["heartbeat_timeout"].default
BOOT_TIMEOUT_S = 120.0
MAX_TOKENS = 8  # greedy answers compared with transformers: short, the suite runs on every commit


def stage_roles() -> str:
    roles = os.environ.get(ROLES_ENV, DEFAULT_ROLES).strip().upper()
    if not roles or set(roles) - set("EPD") or len(set(roles)) != len(roles):
        raise pytest.UsageError(f"{ROLES_ENV}={roles!r}: give some of the letters E, P, D, e.g. D or EP")
    return "".join(r for r in "EPD" if r in roles)


def filler_roles(roles: str) -> list[str]:
    """The processes of our own that host the rest: neighbours in E-P-D share one (EP, PD), so a
    decode under test gets one `EP` process, a prefill under test an `E` and a `D`."""
    groups: list[str] = []
    for r in "EPD":
        if r in roles:
            groups.append("")
        elif groups and groups[-1]:
            groups[-1] += r
        else:
            groups.append(r)
    return [g for g in groups if g]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to all at once, then SIGKILL of the process group of any still running (a stage may
    start children of its own; each leads its own group)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class ConformanceStack:
    def __init__(self, model: Path, tmp: Path) -> None:
        self.model = model
        self.tmp = tmp
        self.roles = stage_roles()
        self.port, self.control_port = free_port(), free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root}/v1"
        self.control = f"tcp://127.0.0.1:{self.control_port}"
        keys = StackKeys.generate()
        self.env = {**os.environ, ENV_PUBLIC: keys.public.decode(), ENV_SECRET: keys.secret.decode(),
                    ENV_DIR: "", "EPD_INSECURE": "", "EPD_API_KEY": ""}  # fmt: skip
        self.fillers = {f"filler-{r.lower()}": r for r in filler_roles(self.roles)}
        self.counts = {r: sum(r in g for g in [self.roles, *self.fillers.values()]) for r in "EPD"}
        self.gateway: subprocess.Popen | None = None
        self.gateway_starts = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.registered_at = 0.0  # monotonic time /health first counted every instance

    # ---- processes ---------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "a") as log:
            return subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start_gateway(self) -> None:
        cmd = [
            sys.executable, "-m", "cli.main", "gateway", "--model", str(self.model),
            "--port", str(self.port), "--control-port", str(self.control_port), "--no-banner",
        ]  # fmt: skip
        self.gateway_starts += 1
        self.gateway = self._spawn("gateway", cmd)

    def kill_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.kill()
        self.gateway.wait(timeout=10)

    def start_stages(self) -> None:
        template = os.environ.get(STAGE_ENV) or DEFAULT_STAGE
        fields = {"gateway": self.control, "model": str(self.model), "roles": self.roles,
                  "instance_id": STAGE_ID}  # fmt: skip
        self.procs[STAGE_ID] = self._spawn(STAGE_ID, shlex.split(template.format(**fields)))
        for instance_id, roles in self.fillers.items():
            cmd = DEFAULT_STAGE.format(**{**fields, "roles": roles, "instance_id": instance_id})
            self.procs[instance_id] = self._spawn(instance_id, shlex.split(cmd))

    def stop(self) -> None:
        _stop([*self.procs.values(), *([self.gateway] if self.gateway else [])])

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.tmp / f"{name}.log"
        return f"--- {name} log ---\n" + (path.read_text()[-tail:] if path.exists() else "(none)")

    def logs(self) -> str:
        return "\n".join(self.log(n) for n in ["gateway", *self.procs])

    # ---- what the gateway says -------------------------------------------------------------------

    def health(self) -> tuple[int | None, dict]:
        try:
            with urllib.request.urlopen(f"{self.root}/health", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return None, {}

    def instances(self) -> dict[str, int]:
        return self.health()[1].get("stages", {}).get("instances", {})

    def wait_registered(self, timeout: float) -> bool:
        """Until /health is 200 with every expected instance counted; fails fast when a process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.health()
            if status == 200 and body["stages"]["instances"] == self.counts:
                return True
            exited = [n for n, p in self.procs.items() if p.poll() is not None]
            if exited:
                raise AssertionError(f"{exited} exited before registering\n{self.logs()}")
            time.sleep(0.1)
        return False

    def gauge(self, name: str) -> dict[str, float]:
        """One per-instance gauge of /metrics, by instance id."""
        with urllib.request.urlopen(f"{self.root}/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        out = {}
        for line in lines:
            if line.startswith(name + "{") and 'instance="' in line:
                instance = line.split('instance="', 1)[1].split('"', 1)[0]
                out[instance] = float(line.rsplit(" ", 1)[1])
        return out

    def stage_id(self) -> str:
        """The instance id of the stage under test: the one listed that is not a filler of ours (its
        template need not use {instance_id})."""
        ids = set(self.gauge("epd_kv_total_blocks")) - set(self.fillers)
        assert len(ids) == 1, f"expected one instance besides {sorted(self.fillers)}, got {sorted(ids)}"
        return ids.pop()


@pytest.fixture(scope="module")
def booting(tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConformanceStack]:
    """Every process started, none waited for (see `stack`)."""
    stack = ConformanceStack(tiny_qwen2_vl, tmp_path_factory.mktemp("conformance"))
    try:
        stack.start_gateway()
        stack.start_stages()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def stack(booting: ConformanceStack, expected: dict) -> ConformanceStack:
    """The stack once every instance is registered (the references were computed meanwhile)."""
    assert booting.wait_registered(BOOT_TIMEOUT_S), f"the stack did not come up\n{booting.logs()}"
    booting.registered_at = time.monotonic()
    return booting


@pytest.fixture(scope="module")
def expected(booting: ConformanceStack, tiny_qwen2_vl: Path) -> dict:
    """transformers' greedy answers and prompt length, computed while `booting`'s processes load."""
    from common.prompting import chat_prompt_ids
    from tests.e2e.conftest import QUESTION, Reference
    from tests.reference import make_image

    ref = Reference(tiny_qwen2_vl)
    images = [make_image(140, 100, seed=0), make_image(224, 168, seed=1)]
    fam, tok = ref.loaded.family, ref.loaded.tokenizer
    prompt = chat_prompt_ids(
        tok, QUESTION, fam.image_token_id, [fam.num_image_tokens(fam.preprocess(images[0]))]
    )
    return {
        "images": images,
        "answers": [ref.answer(img, MAX_TOKENS) for img in images],
        "prompt_tokens": len(prompt),
    }
