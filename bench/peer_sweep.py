"""A rate sweep against vLLM, side by side: every system on the same cores, checkpoint, client and
requests, one server at a time, each started once per run and driven through every rate.

    python -m bench.peer_sweep --model DIR [--rates 2,4,6,8,10] [--num-prompts 160] [--runs 2]
        [--systems "vllm:0-1,vllm:auto,epd:EPD1,epd:E1 PD1,epd:E1 P1 D1"] [--client vllm|epd|vllm,epd]
        [--repeat-image-fraction 0.5 --system-prompt-words 84] [--output FILE.json]

Each (run, rate) has its own seed, the same for every system, so a point's images and prompts are new
to every server (no cache carries over from the rate before) and every server gets the same requests.
Warm-up requests come from yet other seeds. Before each server starts, the machine must be quiet; the
CPU that other processes used while a point ran is recorded, and a point where it passed
`--retry-other-pct` is run once more (with a new seed for both passes, so caches stay cold).

With `--client vllm,epd` each rate runs once per client on the same server: the two clients' figures
for one server, side by side (does our client flatter us?). For our servers every point also records
the gateway's own mean TTFT and TPOT over its measured requests (its /metrics histograms, read after
the warm-up pass and at the end): a third reading that no client's overhead moves.

Printed per run: each system's goodput (SLO: TTFT 2 s, TPOT 50 ms) and SLO attainment per rate, our
best topology over vLLM's best binding, and the highest rate each system sustains at 90% attainment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import asdict
from pathlib import Path

from bench.peer_clients import Workload, run_epd_client, run_vllm_client
from bench.peer_systems import CpuWindow, Peer, Server, System, server_view, wait_quiet

DEFAULT_SYSTEMS = "vllm:0-1,vllm:auto,epd:EPD1,epd:E1 PD1,epd:E1 P1 D1"
SUSTAINED = 0.9  # SLO attainment a rate must keep to count as sustained
MARGIN = 1.3  # the goodput ratio the issue asks for where vLLM's best binding first falls below SUSTAINED


def seed_of(run: int, rate_index: int, attempt: int = 0) -> int:
    return 1000 * run + 10 * rate_index + attempt


def measure_system(args, system: System, peer: Peer, work: Workload, run: int, out: Path) -> list[dict]:
    quiet = wait_quiet(args.quiet_pct)
    label = system.label.replace(" ", "_")
    server = Server(
        system, args.model, args.port, peer, out / f"run{run}-{label}.server.log", args.vllm_extra
    )
    rows = []
    try:
        startup = server.wait_ready(args.ready_timeout)
        model_id = server.model_id()
        print(f"  {system.label}: ready in {startup:.0f} s (machine {quiet:.0f}% busy before)", flush=True)
        for i, rate in enumerate(args.rates):
            for client in args.clients:
                row = measure_point(args, server, model_id, peer, work, (run, i, rate, client), out)
                rows.append({**row, "startup_s": round(startup)})
    finally:
        server.stop()
    return rows


def measure_point(args, server: Server, model_id: str, peer: Peer, work: Workload, point, out: Path) -> dict:
    """One rate with one client; run again (new seed) if other processes used the CPU meanwhile."""
    run, index, rate, client = point
    system = server.system
    name = system.label if len(args.clients) == 1 else f"{system.label} [{client} client]"
    marks: list[dict | None] = []  # the server's counters once a pass's warm-up is done

    def mark() -> None:
        marks.append(server.latency_totals())

    for attempt in range(2):
        seed = seed_of(run, index, attempt)
        dest = out / f"run{run}-{system.label.replace(' ', '_')}-{client}-r{rate:g}-a{attempt}.json"
        with CpuWindow(server.proc.pid) as cpu:
            if client == "vllm":
                res = run_vllm_client(peer, args.model, model_id, server.base, rate, args.num_prompts, seed,
                                      args.warmups, work, dest, args.bench_timeout, mark)  # fmt: skip
            else:
                res = run_epd_client(model_id, server.base, rate, args.num_prompts, seed, args.warmups, work,
                                     dest, args.bench_timeout, mark)  # fmt: skip
        row = {"run": run, "system": name, "client": client, "rate": rate, "attempt": attempt, "seed": seed,
               "resident_mib": server.resident_mib(),
               "cpu_pct": {"server": round(cpu.server), "client": round(cpu.client), "other": round(cpu.other)},
               **asdict(res), "attainment": res.attainment,
               "server_view": server_view(marks[-1], server.latency_totals())}  # fmt: skip
        print("    " + point_line(row), flush=True)
        if cpu.other <= args.retry_other_pct:
            break
        if attempt == 0:
            print(f"    other processes used {cpu.other:.0f}% of a core: running the point again")
    return row


def point_line(row: dict) -> str:
    return (f"{row['rate']:>5g} req/s  ok {row['completed']:>3}/{row['num_prompts']}  goodput {row['goodput']:5.2f}"
            f"  SLO {row['attainment']:6.1%}  TTFT {row['mean_ttft_ms']:7.1f} (p99 {row['p99_ttft_ms']:7.1f})"
            f"  TPOT {row['mean_tpot_ms']:6.2f} (p99 {row['p99_tpot_ms']:6.2f}) ms"
            f"  cpu srv/cli/other {row['cpu_pct']['server']}/{row['cpu_pct']['client']}/{row['cpu_pct']['other']}%"
            + server_line(row.get("server_view")))  # fmt: skip


def server_line(view: dict | None) -> str:
    if not view or view["mean_ttft_ms"] is None:
        return ""
    tpot = f"{view['mean_tpot_ms']:.2f}" if view["mean_tpot_ms"] is not None else "-"
    return (
        f"  gateway's own TTFT {view['mean_ttft_ms']:.1f} TPOT {tpot} ms ({view['ttft_requests']} requests)"
    )


def summary(rows: list[dict], rates: list[float]) -> dict:
    """Per run: goodput table, best-ours / best-vLLM per rate, highest sustained rate per system, and
    vLLM's knee: the lowest rate where its best binding's attainment falls below 90%, with our ratio
    there and the most any ratio can be there (a system at 100% has at most 1/attainment the goodput)."""
    out: dict = {}
    for run in sorted({r["run"] for r in rows}):
        mine = [r for r in rows if r["run"] == run]
        systems = list(dict.fromkeys(r["system"] for r in mine))
        at = {(r["system"], r["rate"]): r for r in mine}
        ratios, sustained = {}, {}
        for rate in rates:
            vllm = [at[s, rate]["goodput"] for s in systems if s.startswith("vLLM") and (s, rate) in at]
            ours = [at[s, rate]["goodput"] for s in systems if not s.startswith("vLLM") and (s, rate) in at]
            if vllm and ours:
                ratios[rate] = max(ours) / max(vllm) if max(vllm) > 0 else float("inf")
        for s in systems:
            ok = [rate for rate in rates if (s, rate) in at and at[s, rate]["attainment"] >= SUSTAINED]
            sustained[s] = max(ok) if ok else None
        out[run] = {"ours_best_over_vllm_best": ratios, "highest_sustained_rate": sustained,
                    "vllm_knee": knee(at, systems, rates, ratios)}  # fmt: skip
    return out


def knee(at: dict, systems: list[str], rates: list[float], ratios: dict) -> dict | None:
    vllm = [s for s in systems if s.startswith("vLLM")]
    for rate in rates:
        best = max((at[s, rate]["attainment"] for s in vllm if (s, rate) in at), default=None)
        if best is not None and best < SUSTAINED and rate in ratios:
            bound = 1 / best if best > 0 else float("inf")
            return {"rate": rate, "vllm_best_attainment": best, "ratio": ratios[rate],
                    "most_possible_ratio": bound, "met": ratios[rate] >= MARGIN}  # fmt: skip
    return None


def print_tables(rows: list[dict], rates: list[float], summ: dict) -> None:
    for run, s in summ.items():
        mine = [r for r in rows if r["run"] == run]
        systems = list(dict.fromkeys(r["system"] for r in mine))
        at = {(r["system"], r["rate"]): r for r in mine}
        print(f"\nrun {run}: goodput req/s (SLO attainment), TTFT / TPOT mean ms")
        print(f"{'system':<14}" + "".join(f"{f'{rate:g} req/s':>30}" for rate in rates) + "   sustains")
        for name in systems:
            cells = []
            for rate in rates:
                r = at.get((name, rate))
                cells.append(f"{r['goodput']:.2f} ({r['attainment']:.0%}) {r['mean_ttft_ms']:.0f}/{r['mean_tpot_ms']:.1f}"
                             if r else "-")  # fmt: skip
            sus = s["highest_sustained_rate"][name]
            print(
                f"{name:<14}" + "".join(f"{c:>30}" for c in cells) + f"   {sus if sus is not None else '-'}"
            )
        ratio = s["ours_best_over_vllm_best"]
        print(
            f"{'ours/vLLM':<14}"
            + "".join(f"{f'{ratio[rate]:.2f}x' if rate in ratio else '-':>30}" for rate in rates)
        )
        k = s["vllm_knee"]
        if k is None:
            print("vLLM's best binding kept 90% attainment at every rate")
        else:
            print(f"vLLM's best binding first falls below 90% at {k['rate']:g} req/s ({k['vllm_best_attainment']:.0%}):"
                  f" ours/vLLM {k['ratio']:.2f}x there (about {k['most_possible_ratio']:.2f}x at most: a system at 100% over one at this attainment),"
                  f" {MARGIN}x {'met' if k['met'] else 'not met'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder both servers load")
    p.add_argument("--rates", default="2,4,6,8,10", help="Poisson arrival rates, req/s (2,4,6,8,10)")
    p.add_argument("--num-prompts", type=int, default=160, help="measured requests per rate (160)")
    p.add_argument("--warmups", type=int, default=8, help="warm-up requests before each rate (8)")
    p.add_argument("--runs", default="1,2", help="run numbers, comma-separated; each its own seeds (1,2)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f'comma-separated ("{DEFAULT_SYSTEMS}"); an epd system may name `epd-serve up` '
                        'flags after its topology, to compare settings in one run ("epd:EPD1 '
                        '--encoder-thread off")')  # fmt: skip
    p.add_argument("--client", default="vllm",
                   help="load generator: vllm (`vllm bench serve`), epd (`epd-serve bench`), or both, "
                        "vllm,epd: each rate then runs once per client on the same server (vllm)")  # fmt: skip
    p.add_argument("--repeat-image-fraction", type=float, default=0.0,
                   help="epd client: share of images repeating an earlier request's (0)")  # fmt: skip
    p.add_argument("--system-prompt-words", type=int, default=0,
                   help="epd client: words of a system prompt all requests share (0; 84 is about 200 tokens)")  # fmt: skip
    p.add_argument(
        "--prompt-words", type=int, default=27, help="epd client: prompt words (27: about 64 tokens)"
    )
    p.add_argument("--peer-home", default=os.environ.get("EPD_PEER_HOME", str(Path.home() / ".cache/epd-peer")),
                   help="vLLM's install (EPD_PEER_HOME, default ~/.cache/epd-peer)")  # fmt: skip
    p.add_argument("--peer-scripts", default="../shared/peer", help="folder of vllm_cli.py (../shared/peer)")
    p.add_argument("--vllm-extra", default="--limit-mm-per-prompt '{\"video\":0}'",
                   help="extra `vllm serve` flags, shell-quoted (the default keeps vLLM's start-up profiling "
                        "from feeding our checkpoints' video processor a dummy video without metadata)")  # fmt: skip
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--ready-timeout", type=float, default=420.0)
    p.add_argument("--bench-timeout", type=float, default=900.0)
    p.add_argument(
        "--quiet-pct", type=float, default=25.0, help="machine busy %% of a core to start a server (25)"
    )
    p.add_argument(
        "--retry-other-pct", type=float, default=20.0, help="rerun a point above this other CPU (20)"
    )
    p.add_argument("--out-dir", default="/tmp/epd-peer-sweep", help="logs and per-point JSON")
    p.add_argument("--output", help="write every point and the summary as JSON here")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.clients = args.client.split(",")
    if not set(args.clients) <= {"vllm", "epd"}:
        p.error(f"--client: vllm, epd or vllm,epd, got {args.client!r}")
    args.vllm_extra = shlex.split(args.vllm_extra)
    args.model = str(Path(args.model).resolve())
    systems = [System.parse(s.strip()) for s in args.systems.split(",")]
    peer = Peer(Path(args.peer_home), Path(args.peer_scripts).resolve())
    work = Workload(prompt_words=args.prompt_words, repeat_image_fraction=args.repeat_image_fraction,
                    system_prompt_words=args.system_prompt_words)  # fmt: skip
    out = Path(args.out_dir) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    rows: list[dict] = []
    for run in (int(r) for r in args.runs.split(",")):
        print(
            f"run {run}: {args.client} client, {args.num_prompts} requests per rate, rates {args.rates}",
            flush=True,
        )
        for system in systems:
            rows += measure_system(args, system, peer, work, run, out)
            if args.output:  # after every system: a stopped sweep keeps what it measured
                write(args, work, rows, summary(rows, args.rates))
    summ = summary(rows, args.rates)
    print_tables(rows, args.rates, summ)
    if args.output:
        write(args, work, rows, summ)
    return 0


def write(args, work: Workload, rows: list[dict], summ: dict) -> None:
    report = {"benchmark": "bench.peer_sweep", "client": args.client, "rates": args.rates,
              "num_prompts": args.num_prompts, "warmups": args.warmups, "workload": asdict(work),
              "vllm_extra": args.vllm_extra, "model": Path(args.model).name, "points": rows,
              "summary": {str(k): v for k, v in summ.items()}}  # fmt: skip
    Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
