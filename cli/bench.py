"""`epd-serve bench`: load an OpenAI-compatible server with multimodal chat requests (bench/serve/)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from bench.serve.options import add_arguments

    p = subparsers.add_parser(
        "bench",
        help="serving benchmark: TTFT, TPOT, ITL, throughput and goodput, topologies side by side",
        description=(
            "Send a synthetic multimodal workload (random-noise images, fixed output lengths) to an "
            "OpenAI-compatible server, open loop (Poisson arrivals at --rate) or closed loop "
            "(--concurrency clients), and report latencies, throughput, SLO attainment and goodput. "
            "With --topologies, each topology is started here in turn and measured on the same "
            "workload, with ratios against the first."
        ),
    )
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from bench.serve.runner import run as run_bench

    return run_bench(args)
