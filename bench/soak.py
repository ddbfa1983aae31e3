"""A bounded soak: sustained mixed load on one stack, and whether anything grows that should not.

Clients (`--concurrency` of them) send streamed chat requests for `--minutes`: text only, one new
image, or an image an earlier request sent (the encoder cache), and a share of them hang up after the
first chunk. Every `--sample-s` seconds the resident memory and open file descriptors of every process
of the stack (the gateway is this process) are read from /proc, and the KV blocks from /metrics. The
report compares the end with the end of the warm-up (the first fifth), and checks that once the load
stops every decode pool is whole again.

    python -m bench.soak [--topology "E1 P1 D1"] [--minutes 10] [--concurrency 16] [--output F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path


def _proc(pid: int) -> tuple[float, int]:
    """(resident MiB, open file descriptors) of a live process."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _kv(metrics: str) -> tuple[float, float]:
    free = total = 0.0
    for line in metrics.splitlines():
        if line.startswith("epd_kv_free_blocks{"):
            free += float(line.rsplit(" ", 1)[1])
        elif line.startswith("epd_kv_total_blocks{"):
            total += float(line.rsplit(" ", 1)[1])
    return free, total


async def _client(
    session, url: str, bodies: list[bytes], hang_up: float, deadline: float, tally: dict
) -> None:
    rng = random.Random(id(tally) ^ len(tally["clients"]))
    tally["clients"].append(1)
    while time.monotonic() < deadline:
        body = rng.choice(bodies)
        leave_early = rng.random() < hang_up
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    tally["errors"] += 1
                    continue
                async for line in r.content:
                    if leave_early and line.startswith(b"data:"):
                        break  # the client goes away mid-stream
                tally["disconnects" if leave_early else "ok"] += 1
        except Exception:
            tally["errors"] += 1


async def _soak(args: argparse.Namespace) -> dict:
    import aiohttp

    from bench.serve.dataset import DatasetConfig, build_dataset
    from bench.serve.target import StackOptions, build_tiny_model, topology_server

    data = DatasetConfig(prompt_len=24, output_len=24, output_len_range=0.5, text_only_fraction=0.3,
                         repeat_image_fraction=0.4, image_sizes=((112, 112), (224, 224)))  # fmt: skip
    bodies = [json.dumps(r.payload(None)).encode() for r in build_dataset(data, 200, args.seed)]
    options = StackOptions(model_dir=args.model or build_tiny_model(), kv_cache_memory=64, threads=1)
    samples, tally = [], {"ok": 0, "disconnects": 0, "errors": 0, "clients": []}
    async with topology_server(args.topology, options) as server, aiohttp.ClientSession() as session:
        pids = {"gateway": os.getpid()}
        pids |= {f"stage{i}": p.pid for i, p in enumerate(server.stack.children) if p is not None}
        start = time.monotonic()
        deadline = start + args.minutes * 60
        clients = [
            asyncio.create_task(_client(session, server.chat_url, bodies, args.hang_up, deadline, tally))
            for _ in range(args.concurrency)
        ]
        while time.monotonic() < deadline:
            await asyncio.sleep(args.sample_s)
            async with session.get(server.base_url.removesuffix("/v1") + "/metrics") as r:
                free, total = _kv(await r.text())
            procs = {name: _proc(pid) for name, pid in pids.items()}
            samples.append({"t": time.monotonic() - start, "procs": procs, "free_kv": free, "total_kv": total,
                            "served": tally["ok"] + tally["disconnects"]})  # fmt: skip
            print(f"{samples[-1]['t']:6.0f} s  served {samples[-1]['served']:6d}  errors {tally['errors']:4d}  "
                  + "  ".join(f"{n} {m:.0f}MiB/{fd}fd" for n, (m, fd) in procs.items()), flush=True)  # fmt: skip
        await asyncio.gather(*clients)
        await asyncio.sleep(3)  # the last aborts and releases land
        async with session.get(server.base_url.removesuffix("/v1") + "/metrics") as r:
            free, total = _kv(await r.text())
    warm = samples[max(0, len(samples) // 5 - 1)]
    end = samples[-1]
    growth = {n: {"rss_mib": end["procs"][n][0] - warm["procs"][n][0], "fds": end["procs"][n][1] - warm["procs"][n][1]}
              for n in end["procs"]}  # fmt: skip
    return {"topology": args.topology, "minutes": args.minutes, "concurrency": args.concurrency,
            "ok": tally["ok"], "disconnects": tally["disconnects"], "errors": tally["errors"],
            "growth_after_warmup": growth, "kv_free_at_end": free, "kv_total": total, "samples": samples}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="E1 P1 D1", help='the stack to soak (default "E1 P1 D1")')
    p.add_argument("--model", help="checkpoint folder (default: the tiny built-in model)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load lasts (default 10)")
    p.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default 16)")
    p.add_argument(
        "--hang-up", type=float, default=0.1, help="share of requests cut after the first chunk (0.1)"
    )
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the report as JSON here")
    args = p.parse_args(argv)
    report = asyncio.run(_soak(args))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    whole = report["kv_free_at_end"] == report["kv_total"]
    return 0 if whole and report["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
