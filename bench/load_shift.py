"""A load that shifts mid-run: the role planner against fixed topologies on the same processes and cores.

    python -m bench.load_shift [--fixed "E2 P1 D1,E1 P2 D1,E1 P1 D2"] [--planner-start "E2 P1 D1"] \
        [--phase-seconds 30] [--output FILE] [--plot-dir DIR]

The workload has three phases of one open-loop arrival stream: image-heavy prompts with short answers
(encode and prefill work), then text-only prompts with long answers (decode work), then the first
kind again. Every system sees exactly the same requests at the same offsets from its start. The
systems are the fixed topologies of `--fixed` and one run with the planner on (gateway/planner.py),
starting from `--planner-start` with as many processes; all have the same number of single-role
processes, so the same cores and threads are shared the same way, and only who does what differs.

Goodput counts the requests that met both SLO bounds (TTFT and TPOT), per phase (over the phase's
length) and for the whole run (over the time from the first send to the last answer). The report
names the best fixed topology of the whole run and the fixed topology best in the first phase, and
gives the planner's goodput against each. While a system runs, its instances' roles and the
planner's pressures are sampled twice a second (the gateway runs in this process), so the plot shows
when each move happened against the phases.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.serve.dataset import BenchRequest, DatasetConfig, build_dataset
from bench.serve.metrics import Slo, summarize
from bench.serve.runner import encode_bodies, sender, warm_up
from bench.serve.target import StackOptions, build_tiny_model, served_model, topology_server
from gateway.planner_config import PlannerConfig


@dataclass(frozen=True, slots=True)
class Phase:
    """One stretch of the run: Poisson arrivals at `rate` for `seconds`, one kind of request."""

    name: str
    seconds: float
    rate: float
    images: int
    output_len: int
    prompt_len: int = 64


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # seconds after the run's start
    phase: int
    request: BenchRequest


def phases_of(args: argparse.Namespace) -> list[Phase]:
    image = Phase(
        "images, short answers", args.phase_seconds, args.image_rate, args.images, args.image_output_len
    )
    text = Phase(
        "text, long answers",
        args.phase_seconds,
        args.text_rate,
        0,
        args.text_output_len,
        args.text_prompt_len,
    )
    return [image, text, dataclasses.replace(image, name="images again")]


def schedule(phases: list[Phase], seed: int, image_size: tuple[int, int] = (224, 224)) -> list[Arrival]:
    """Every request of the run with its send time; indices run across the phases, so they are unique."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    start = 0.0
    for k, phase in enumerate(phases):
        times, t = [], start + rng.expovariate(phase.rate)
        while t < start + phase.seconds:
            times.append(t)
            t += rng.expovariate(phase.rate)
        config = DatasetConfig(
            prompt_len=phase.prompt_len, output_len=phase.output_len, images=phase.images,
            image_sizes=(image_size,),
        )  # fmt: skip
        for at, request in zip(times, build_dataset(config, len(times), seed, stream=k), strict=True):
            out.append(Arrival(at, k, dataclasses.replace(request, index=len(out))))
        start += phase.seconds
    return out


def warm_requests(phases: list[Phase], seed: int, per_phase: int = 2) -> list[BenchRequest]:
    """A few requests of every kind, on their own stream of the seed (nothing the run sends again)."""
    out: list[BenchRequest] = []
    for k, phase in enumerate(phases[:2]):
        config = DatasetConfig(prompt_len=phase.prompt_len, output_len=phase.output_len, images=phase.images)
        for request in build_dataset(config, per_phase, seed, stream=(1 << 21) + k):
            out.append(dataclasses.replace(request, index=len(out)))
    return out


def phase_summaries(
    arrivals: list[Arrival], records: list[Any], phases: list[Phase], duration: float, slo: Slo
) -> dict[str, Any]:
    """Per phase (over the phase's length) and over the whole run: summarize()'s figures."""
    by_index = {r.index: r for r in records}
    out: dict[str, Any] = {"whole": summarize(records, duration, slo), "phases": []}
    for k, phase in enumerate(phases):
        mine = [by_index[a.request.index] for a in arrivals if a.phase == k and a.request.index in by_index]
        out["phases"].append({"name": phase.name, **summarize(mine, phase.seconds, slo)})
    return out


class RoleSampler:
    """Twice a second: each instance's roles (a pending change shows as 'P>D') and the planner's pressures."""

    def __init__(self, cluster: Any, t0: float) -> None:
        self.cluster, self.t0, self.samples = cluster, t0, []

    async def run(self) -> None:
        while True:
            rows = {}
            for inst in list(self.cluster.registry.instances.values()):
                pending = getattr(inst, "pending_roles", None)
                rows[inst.id] = inst.info.roles + (f">{pending or '-'}" if pending is not None else "")
            signals = getattr(self.cluster.planner, "last_signals", {}) or {}
            pressures = {role: round(s.pressure, 3) for role, s in signals.items()}
            self.samples.append(
                {"t": round(time.perf_counter() - self.t0, 2), "roles": rows, "pressure": pressures}
            )
            await asyncio.sleep(0.5)


async def run_system(
    name: str, topology: str, options: StackOptions, arrivals: list[Arrival], phases: list[Phase],
    warm: list[BenchRequest], slo: Slo, timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """Start one system, warm it, send the whole schedule, stop it; its figures and role samples."""
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        topology_server(topology, options) as server,
    ):
        server.model = await served_model(session, server.base_url)
        await warm_up(session, server, warm, timeout)
        send = sender(session, server, timeout, encode_bodies([a.request for a in arrivals], server.model))
        t0 = time.perf_counter()
        sampler = RoleSampler(server.stack.cluster, t0)
        sampling = asyncio.create_task(sampler.run())

        async def at(arrival: Arrival):
            await asyncio.sleep(max(0.0, t0 + arrival.at - time.perf_counter()))
            return await send(arrival.request)

        try:
            records = list(await asyncio.gather(*(at(a) for a in arrivals)))
        finally:
            sampling.cancel()
        duration = max(r.end for r in records) - t0
        changes = server.stack.cluster.role_changes
        result = {
            "system": name, "topology": topology, "planner": options.planner.mode,
            "role_changes": changes.changes, "handoffs": changes.handoffs,
            "exited_stages": server.exited_stages(),
            **phase_summaries(arrivals, records, phases, duration, slo),
            "ttfts": [r.ttft if r.success else None for r in records],
            "tpots": [r.tpot if r.success else None for r in records],
            "sent_at": [round(a.at, 3) for a in arrivals], "phase_of": [a.phase for a in arrivals],
            "role_samples": sampler.samples,
        }  # fmt: skip
    return result


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The best fixed topology (whole run), the fixed one best in phase one, the planner against each."""
    fixed = [r for r in results if r["planner"] == "off"]
    planned = [r for r in results if r["planner"] == "on"]
    if not fixed:
        return {}
    best = max(fixed, key=lambda r: r["whole"]["goodput"])
    first = max(fixed, key=lambda r: r["phases"][0]["goodput"])
    out: dict[str, Any] = {"best_fixed": best["system"], "first_phase_best_fixed": first["system"]}
    if planned:
        p = planned[0]["whole"]["goodput"]
        out["planner_vs_best_fixed"] = p / best["whole"]["goodput"] if best["whole"]["goodput"] else None
        out["planner_vs_first_phase_best"] = (
            p / first["whole"]["goodput"] if first["whole"]["goodput"] else None
        )
    return out


def format_table(results: list[dict[str, Any]], phases: list[Phase]) -> str:
    head = ["system", *(f"{k + 1}: {p.name}" for k, p in enumerate(phases)), "whole run", "moves", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [f"{ph['goodput']:.2f} ({ph['slo_attainment'] or 0:.0%})" for ph in r["phases"]]
        w = r["whole"]
        cells.append(f"**{w['goodput']:.2f}** ({w['slo_attainment'] or 0:.0%})")
        lines.append(f"| {r['system']} | " + " | ".join(cells) + f" | {r['role_changes']} | {w['failed']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load_shift", description=__doc__.split("\n\n")[0])
    # fmt: off
    p.add_argument("--model", help="checkpoint folder (default: the built-in small Qwen2-VL)")
    p.add_argument("--fixed", default="E2 P1 D1,E1 P2 D1,E1 P1 D2", help="fixed topologies, "
                   'comma-separated (default "E2 P1 D1,E1 P2 D1,E1 P1 D2": every 4-process split)')
    p.add_argument("--planner-start", default="E2 P1 D1", help='the planner run\'s first topology '
                   '(default "E2 P1 D1", the best for the first phase; "" skips it)')
    p.add_argument("--phase-seconds", type=float, default=30.0, help="length of each phase (30)")
    p.add_argument("--image-rate", type=float, default=10.0, help="req/s in the image phases (10)")
    p.add_argument("--text-rate", type=float, default=5.0, help="req/s in the text phase (5)")
    p.add_argument("--images", type=int, default=1, help="224x224 images per image-phase request (1)")
    p.add_argument("--image-prompt-len", type=int, default=1000, help="words of text per image-phase prompt (1000)")
    p.add_argument("--text-prompt-len", type=int, default=64, help="words per text-phase prompt (64)")
    p.add_argument("--image-output-len", type=int, default=16, help="tokens per image-phase answer (16)")
    p.add_argument("--text-output-len", type=int, default=256, help="tokens per text-phase answer (256)")
    p.add_argument("--stable-seconds", type=float, default=4.0, help="planner: armed this long before a move (4)")
    p.add_argument("--cooldown-seconds", type=float, default=12.0, help="planner: quiet after a move (12)")
    p.add_argument("--no-load-on-demand", action="store_true",
                   help="planner: only P <-> D moves (default: E <-> P/D too, loading the weights they lack)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="(2000)")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0, help="(50)")
    p.add_argument("--seed", type=int, default=0, help="of the workload and the arrivals (0)")
    p.add_argument("--output", help="write every system's figures, per request too, as JSON here")
    p.add_argument("--plot-dir", help="write goodput and role-timeline PNGs here (needs matplotlib)")
    # fmt: on
    return p


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or build_tiny_model("qwen2_vl", "small")
    phases = phases_of(args)
    arrivals = schedule(phases, args.seed)
    warm = warm_requests(phases, args.seed)
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    planner = PlannerConfig(
        mode="on", stable_s=args.stable_seconds, cooldown_s=args.cooldown_seconds,
        allow_load_on_demand=not args.no_load_on_demand,
    )  # fmt: skip
    systems = [(f"fixed {t.strip()}", t.strip(), PlannerConfig()) for t in args.fixed.split(",") if t.strip()]
    if args.planner_start.strip():
        systems.append((f"planner from {args.planner_start.strip()}", args.planner_start.strip(), planner))
    print(f"[load-shift] {len(arrivals)} requests in {len(phases)} phases", file=sys.stderr, flush=True)
    results = []
    for name, topology, config in systems:
        print(f"[load-shift] {name}", file=sys.stderr, flush=True)
        options = StackOptions(model_dir=model, planner=config)
        results.append(await run_system(name, topology, options, arrivals, phases, warm, slo, 600.0))
    return {
        "benchmark": "load shift", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: v for k, v in vars(args).items() if k != "model"}, "cpu_count": os.cpu_count(),
        "phases": [dataclasses.asdict(p) for p in phases], "requests": len(arrivals),
        "results": results, "comparison": compare(results),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from common.log import configure_logging

    args = build_parser().parse_args(argv)
    level = (os.environ.get("EPD_LOG_LEVEL") or "WARNING").upper()
    os.environ["EPD_LOG_LEVEL"] = level  # the stage processes read it
    configure_logging("bench", level=level)
    report = asyncio.run(_main(args))
    print(format_table(report["results"], phases_of(args)))
    print(json.dumps(report["comparison"], indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot_dir:
        from bench.load_shift_plots import write_plots

        print("wrote", ", ".join(str(p) for p in write_plots(report, args.plot_dir)))
    return 0 if all(r["whole"]["failed"] == 0 for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
