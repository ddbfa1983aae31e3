"""`epd-serve bench` end to end: every target (topology) at every load point, then the report.

Order of work, per target: start it (or reach it), read its model name, send the warm-up requests (first
calls pay for lazy initialisation that no steady state has), then one run per load point. Each load
point has its own workload drawn from the seed (same shape, fresh images and prompts), so a later load
point never hits caches filled by an earlier one, and every topology sees exactly the same requests
and arrival times at a given point.

Request bodies are JSON-encoded before the clock starts. The gateway of a stack started here shares
this process and its event loop with the load generator; the client's share of that loop is kept
small (pre-encoded bodies, one `json.loads` per chunk), but a very fast server is better measured from
outside with --base-url.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from bench.serve.client import RequestRecord, send_request
from bench.serve.dataset import BenchRequest, DatasetConfig, build_dataset
from bench.serve.load import LoadPoint, run_load
from bench.serve.media import VIDEO_FPS
from bench.serve.metrics import Slo, details, summarize
from bench.serve.report import add_ratios, format_tables, write_json
from bench.serve.target import (
    Server,
    StackOptions,
    applicable,
    build_tiny_model,
    is_loopback,
    served_model,
    topology_server,
)

DEFAULT_TOPOLOGIES = ["EPD1", "E1 P1 D1"]
WARMUP_STREAM = 1 << 20  # the warm-up workload's stream: apart from every load point's


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.concurrency:
        return [LoadPoint(rate=None, concurrency=n) for n in args.concurrency]
    return [LoadPoint(rate=r, concurrency=args.max_concurrency) for r in (args.rate or [math.inf])]


def dataset_config(args: argparse.Namespace) -> DatasetConfig:
    return DatasetConfig(
        prompt_len=args.prompt_len, prompt_len_range=args.prompt_len_range, output_len=args.output_len,
        output_len_range=args.output_len_range, images=args.images, image_sizes=tuple(args.image_size),
        text_only_fraction=args.text_only_fraction, repeat_image_fraction=args.repeat_image_fraction,
        system_prompt_len=args.system_prompt_len, videos=args.videos, video_size=tuple(args.video_size),
        video_seconds=args.video_seconds, audios=args.audios, audio_seconds=args.audio_seconds,
    )  # fmt: skip


def _check(args: argparse.Namespace) -> str | None:
    """A usage error, or None."""
    if args.num_requests < 1 or args.warmup < 0:
        return "--num-requests must be at least 1 and --warmup at least 0"
    if args.max_concurrency is not None and args.max_concurrency < 1:
        return "--max-concurrency must be at least 1"
    if args.duration is not None and args.duration <= 0 or args.request_timeout <= 0:
        return "--duration and --request-timeout must be positive"
    if args.base_url and not args.allow_remote and not is_loopback(args.base_url):
        return f"{args.base_url} is not a loopback address; pass --allow-remote to load it anyway"
    if not args.base_url:
        error = _check_placement(args)
        if error:
            return error
    if args.plot_dir and importlib.util.find_spec("matplotlib") is None:
        return (
            "--plot-dir needs matplotlib: pip install 'epd-serve[bench]'"  # say so before, not after, a run
        )
    try:
        dataset_config(args)
    except ValueError as exc:
        return str(exc)
    return None


def _check_placement(args: argparse.Namespace) -> str | None:
    """Every topology's placement, before the first one starts. A --devices-for list applies to the
    topologies that have such processes, and must apply to one at least."""
    from cli.placement import place
    from common.topology import parse_topology

    names = args.topologies or DEFAULT_TOPOLOGIES
    processes = {name: parse_topology(name).processes() for name in names}
    for roles, _ in args.devices_for:
        if not any(roles in procs for procs in processes.values()):
            return f"--devices-for {roles}: no process of {', '.join(names)} hosts exactly the roles {roles}"
    for name, procs in processes.items():
        try:
            place(procs, args.device, args.devices, applicable(args.devices_for, procs), os.environ)
        except ValueError as exc:
            return f"topology {name}: {exc}"
    return None


def sender(session: aiohttp.ClientSession, server: Server, timeout: float, bodies: dict[int, bytes]):
    async def send(request: BenchRequest) -> RequestRecord:
        return await send_request(session, server.chat_url, bodies[request.index], request, timeout)

    return send


def encode_bodies(requests: list[BenchRequest], model: str) -> dict[int, bytes]:
    return {r.index: json.dumps(r.payload(model)).encode() for r in requests}


async def warm_up(
    session: aiohttp.ClientSession, server: Server, warm: list[BenchRequest], timeout: float
) -> None:
    if not warm:
        return
    send = sender(session, server, timeout, encode_bodies(warm, server.model))
    records = await asyncio.gather(*(send(r) for r in warm))
    failed = [r.error for r in records if not r.success]
    if failed:
        print(f"warning: {len(failed)} of {len(warm)} warm-up requests failed: {failed[0]}", file=sys.stderr)


async def _one_run(
    session: aiohttp.ClientSession,
    server: Server,
    point: LoadPoint,
    k: int,
    requests: list[BenchRequest],
    args: argparse.Namespace,
    slo: Slo,
) -> dict[str, Any]:
    """Load point `k` against one server: its JSON entry (summary, then per-request values)."""
    from tqdm import tqdm

    send = sender(session, server, args.request_timeout, encode_bodies(requests, server.model))
    with tqdm(
        total=len(requests), desc=f"{server.name} @ {point.label}", unit="req", disable=args.no_progress,
        file=sys.stderr, dynamic_ncols=True,
    ) as bar:  # fmt: skip
        result = await run_load(
            send, requests, point, seed=args.seed * 1_000_003 + k, max_duration=args.duration,
            on_done=lambda _record: bar.update(1),
        )  # fmt: skip
    issued = {r.index for r in result.records}
    return {
        "topology": server.name, "base_url": server.base_url, "model": server.model,
        "load_label": point.label, "load_x": point.x, **point.to_json(),
        "num_prompts": len(requests), "issued": len(issued),
        "images_sent": sum(r.images for r in result.records),
        "images_repeated": sum(r.repeated for r in requests if r.index in issued),
        **summarize(result.records, result.duration, slo),
        "exited_stages": server.exited_stages(),
        **details(result.records),
    }  # fmt: skip


@contextlib.asynccontextmanager
async def _external(base_url: str) -> AsyncIterator[Server]:
    yield Server(name=base_url, base_url=base_url.rstrip("/"))


async def bench(args: argparse.Namespace, model_dir: str | None) -> dict[str, Any]:
    """Run everything; returns the report (runs, plus any topology that did not start)."""
    config, points, slo = dataset_config(args), load_points(args), Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    options = StackOptions(
        model_dir=model_dir or "", dataplane=args.dataplane, device=args.device, dtype=args.dtype,
        threads=args.threads, cpus=list(args.cpus), pin=args.pin, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager, kv_staging=args.kv_staging, devices=args.devices,
        devices_for=list(args.devices_for),
        max_num_seqs=args.max_num_seqs, swap_space=args.swap_space, ready_timeout=args.ready_timeout,
        enable_prefix_caching=args.enable_prefix_caching, encoder_dtype=args.encoder_dtype,
        encoder_batch_tokens=args.encoder_batch_tokens, linear_backend=args.linear_backend,
        encoder_thread=args.encoder_thread,
    )  # fmt: skip
    targets: list[tuple[str, Callable[[], Any]]]
    if args.base_url:
        targets = [(args.base_url, lambda: _external(args.base_url))]
    else:
        names = args.topologies or DEFAULT_TOPOLOGIES
        targets = [(t, lambda t=t: topology_server(t, options)) for t in names]
    warm = build_dataset(config, args.warmup, args.seed, stream=WARMUP_STREAM)
    workloads: dict[int, list[BenchRequest]] = {}  # built once per load point, shared by all targets
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for name, open_target in targets:
            print(
                f"[bench] {'' if args.base_url else 'starting '}{name}",
                file=sys.stderr,
                flush=True,
            )
            try:
                async with open_target() as server:
                    server.model = (args.model if args.base_url else None) or await served_model(
                        session, server.base_url
                    )
                    await warm_up(session, server, warm, args.request_timeout)
                    for k, point in enumerate(points):
                        if k not in workloads:
                            workloads[k] = build_dataset(config, args.num_requests, args.seed, stream=k)
                        run = await _one_run(session, server, point, k, workloads[k], args, slo)
                        runs.append({**run, "warmup": len(warm)})
            except Exception as exc:  # one topology that cannot start must not lose the others' results
                print(f"[bench] {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                failures.append({"topology": name, "error": f"{type(exc).__name__}: {exc}"})
    add_ratios(runs)
    return {"runs": runs, "failures": failures}


def _workload_line(args: argparse.Namespace, model_dir: str | None) -> str:
    sizes = ",".join(f"{w}x{h}" for w, h in args.image_size)
    parts = [
        f"model {model_dir or args.base_url}",
        f"{args.images} image(s) of {sizes} per request",
        *_media_parts(args),
        f"prompt {args.prompt_len} words",
        f"output {args.output_len} tokens",
    ]
    if args.text_only_fraction or args.repeat_image_fraction:
        parts.append(f"text-only {args.text_only_fraction:g}, repeated images {args.repeat_image_fraction:g}")
    if args.system_prompt_len:
        parts.append(f"a shared system prompt of {args.system_prompt_len} words")
    return "; ".join(parts)


def _media_parts(args: argparse.Namespace) -> list[str]:
    parts = []
    if args.videos:
        w, h = args.video_size
        parts.append(
            f"{args.videos} video(s) of {args.video_seconds:g} s at {w}x{h}, {VIDEO_FPS} fps per request"
        )
    if args.audios:
        parts.append(f"{args.audios} audio clip(s) of {args.audio_seconds:g} s per request")
    return parts


def _config_json(args: argparse.Namespace, model_dir: str | None) -> dict[str, Any]:
    plain = {k: v for k, v in vars(args).items() if not callable(v)}
    return {**plain, "model_dir": model_dir, "cpu_count": os.cpu_count()}


def run(args: argparse.Namespace) -> int:
    from common.log import configure_logging

    error = _check(args)
    if error:
        print(f"epd-serve bench: error: {error}", file=sys.stderr)
        return 2
    level = (args.log_level or os.environ.get("EPD_LOG_LEVEL") or "WARNING").upper()
    os.environ["EPD_LOG_LEVEL"] = level  # the stage processes read it
    configure_logging("bench", level=level)
    model_dir = None
    if not args.base_url:
        try:
            model_dir = args.model or build_tiny_model("qwen2_vl", args.tiny_preset)
        except subprocess.CalledProcessError as exc:
            print(
                f"epd-serve bench: error: building the tiny model failed:\n{exc.stderr[-2000:]}",
                file=sys.stderr,
            )
            return 1
    started = time.time()
    report = asyncio.run(bench(args, model_dir))
    report = {
        "benchmark": "epd-serve bench",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": time.time() - started,
        "config": _config_json(args, model_dir),
        **report,
    }
    print(f"\n{_workload_line(args, model_dir)}")
    print(format_tables(report["runs"]), flush=True)
    if args.output:
        write_json(args.output, report)
        print(f"\nwrote {args.output}")
    if args.plot_dir and report["runs"]:
        from bench.serve.plots import write_plots

        files = write_plots(report["runs"], args.plot_dir)
        print(f"wrote {', '.join(str(f) for f in files)}")
    return 1 if report["failures"] or not report["runs"] else 0
