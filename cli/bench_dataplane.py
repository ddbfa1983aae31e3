"""`epd-serve bench-dataplane`: each data-plane backend against a memory copy (bench/dataplane.py)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from bench.dataplane import add_arguments

    p = subparsers.add_parser(
        "bench-dataplane",
        help="data-plane throughput (GB/s) of each backend against a plain memory copy",
        description=(
            "Move 1, 16 and 256 MiB (--sizes) from a producer process into this one with each data-plane "
            "backend and report GB/s (median of --repeats, after a warm-up transfer) and the ratio to "
            "np.copyto between two preallocated buffers, measured in the same run."
        ),
    )
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from bench.dataplane import run as run_bench

    return run_bench(args)
