"""Data-plane benchmark: each backend against a plain memory copy, producer in another process.

What a stage pays to move encoder features or KV blocks is the backend's end-to-end time: from the
producer's `write()` to the consumer's handle turning SUCCESS (both read CLOCK_MONOTONIC, which is
shared by the processes of one host). The yardstick is `np.copyto` between two preallocated buffers in
one process, the floor that no backend can beat, so the ratio says how much of the memory bandwidth a
backend delivers. Every backend first writes once into the same destination (untimed): a first write
pays for mapping pages and opening connections, which a serving process does once at start-up.
Each timed transfer reuses that buffer; the bytes are checked against the source afterwards.

    python -m bench.dataplane [--backends shm,tcp,torchdist,mooncake,nixl] [--sizes 1,16,256] [--repeats 5]

The producer runs `python -m bench.dataplane --peer BACKEND`, driven by JSON lines on stdin: only
descriptors, ids and timestamps cross between the processes; the bytes go over the backend measured.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]  # the repository root, for the producer's imports


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """Bytes that differ at every 8-byte word and per seed, so shifted or stale data shows."""
    import numpy as np  # here, not at the top: `epd-serve --help` imports this module

    words = np.arange((nbytes + 7) // 8, dtype=np.uint64) + np.uint64((seed % (1 << 24)) << 40)
    return words.view(np.uint8)[:nbytes]


# -- producer (the other process) ---------------------------------------------------------------------


def _plane(spec: str, keys: Any = None) -> Any:
    """A plane for a backend name, "+curve" meaning its ZeroMQ sockets run CURVE with `keys`."""
    from common.dataplane import create_dataplane

    backend, _, curve = spec.partition("+")
    return create_dataplane(backend, keys=keys if curve == "curve" else None)


def peer_main(backend: str) -> None:
    """Answer one JSON line per command: `source` makes the bytes, `write` sends them and times it."""
    from common.dataplane import Region
    from common.stack_keys import StackKeys

    plane = _plane(backend, StackKeys.from_environment())
    source: np.ndarray | None = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "source":
                source = pattern(cmd["nbytes"], cmd["seed"])
                reply: dict[str, Any] = {"ok": True}
            elif cmd["op"] == "write":
                assert source is not None
                t0 = time.monotonic()
                handle = plane.write(
                    cmd["peer"], cmd["tid"], [(source, Region(cmd["buffer"], 0, source.nbytes))]
                )
                state = handle.wait(cmd["timeout"])
                reply = {"t0": t0, "state": state.value, "failure": handle.failure()}
            else:
                break
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    plane.close()


class Peer:
    """The producer process; `send` then `read` one reply, each read with a deadline."""

    def __init__(self, backend: str, keys: Any = None) -> None:
        self.backend = backend
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if keys is not None:  # the producer holds the same stack keys
            env |= {
                "EPD_STACK_PUBLIC_KEY": keys.public.decode(),
                "EPD_STACK_SECRET_KEY": keys.secret.decode(),
            }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.dataplane", "--peer", backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT, env=env,
        )  # fmt: skip

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the {self.backend} producer gave no answer within {timeout:g} s:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.backend} producer failed: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="close")
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.log.close()


# -- consumer (this process) --------------------------------------------------------------------------


def memcpy_seconds(nbytes: int, repeats: int) -> list[float]:
    """`np.copyto` between two preallocated buffers, after one untimed copy that faults the pages in."""
    import numpy as np

    src, dst = pattern(nbytes, 1), np.empty(nbytes, np.uint8)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return times


def backend_seconds(
    backend: str, sizes: list[int], repeats: int, timeout: float
) -> dict[int, dict[str, Any]]:
    """Per size: the timed transfers (seconds) and whether the bytes arrived intact."""
    import numpy as np

    from common.dataplane import Region, TransferState
    from common.stack_keys import StackKeys

    keys = StackKeys.generate() if backend.endswith("+curve") else None
    plane = _plane(backend, keys)
    peer = Peer(backend, keys)
    out: dict[int, dict[str, Any]] = {}
    try:
        peer.read(timeout)  # ready
        descriptor = plane.descriptor()
        for size in sizes:
            buffer_id = f"bench-{size}"
            dest = np.frombuffer(plane.allocate(buffer_id, size), np.uint8)
            peer.send(op="source", nbytes=size, seed=size)
            peer.read(timeout)
            times = []
            for i in range(repeats + 1):  # the first is the warm-up
                tid = f"{buffer_id}/{i}"
                handle = plane.expect(tid, [Region(buffer_id, 0, size)])
                peer.send(op="write", peer=descriptor, tid=tid, buffer=buffer_id, timeout=timeout)
                state = handle.wait(timeout)
                end = time.monotonic()
                reply = peer.read(timeout)
                if state is not TransferState.SUCCESS:
                    raise RuntimeError(f"transfer {tid} ended {state.value}: {handle.failure() or reply}")
                if i:
                    times.append(end - reply["t0"])
            out[size] = {"seconds": times, "verified": bool(np.array_equal(dest, pattern(size, size)))}
            del dest
            plane.free(buffer_id)
    finally:
        peer.close()
        plane.close()
    return out


def _row(size: int, backend: str, times: list[float], memcpy_gbps: float | None, verified: bool) -> dict:
    median = statistics.median(times)
    gbps = size / median / 1e9
    return {
        "size_mib": size / MiB, "bytes": size, "backend": backend, "gbps": gbps, "median_s": median,
        "seconds": times, "ratio_to_memcpy": gbps / memcpy_gbps if memcpy_gbps else 1.0, "verified": verified,
    }  # fmt: skip


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'size':>9}  {'backend':<10} {'GB/s':>8} {'vs memcpy':>10} {'median ms':>10}  check"]
    for r in results:
        size = f"{r['size_mib']:g} MiB"
        ok = "ok" if r["verified"] else "WRONG"
        lines.append(
            f"{size:>9}  {r['backend']:<10} {r['gbps']:8.2f} {r['ratio_to_memcpy']:9.2f}x "
            f"{r['median_s'] * 1e3:10.3f}  {ok}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        default="shm,tcp,cudaipc,torchdist,mooncake,nixl",
        help="comma list; NAME+curve runs that plane's ZeroMQ sockets with stack keys (CURVE), e.g. "
        "tcp+curve (default %(default)s)",
    )
    parser.add_argument(
        "--sizes", default="1,16,256", help="transfer sizes in MiB, comma list (default 1,16,256)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers per size; the median counts")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for any one transfer or reply")
    parser.add_argument("--output", metavar="FILE", help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(float(s) * MiB) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        sizes = []
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not sizes or min(sizes) < 1 or not backends or args.repeats < 1:
        print(
            "epd-serve bench-dataplane: error: need sizes > 0, backends and --repeats >= 1", file=sys.stderr
        )
        return 2
    results, failures = [], []
    memcpy = {}
    for size in sizes:
        times = memcpy_seconds(size, args.repeats)
        results.append(_row(size, "memcpy", times, None, True))
        memcpy[size] = results[-1]["gbps"]
    for backend in backends:
        try:
            measured = backend_seconds(backend, sizes, args.repeats, args.timeout)
        except Exception as exc:  # one backend that cannot run must not lose the others
            print(f"{backend}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failures.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for size, m in measured.items():
            results.append(_row(size, backend, m["seconds"], memcpy[size], m["verified"]))
    results.sort(key=lambda r: (r["bytes"], r["backend"] != "memcpy"))
    print(f"producer in another process, {args.repeats} timed transfers per size after one warm-up; medians")
    print(format_table(results))
    if args.output:
        report = {
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
            "results": results,
            "failures": failures,
        }
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failures or not all(r["verified"] for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer"]:
        peer_main(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
