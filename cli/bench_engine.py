"""`epd-serve bench-engine`: the engine benchmark (bench/engine.py) from the command line."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from bench.engine import add_arguments

    p = subparsers.add_parser(
        "bench-engine",
        help="measure our engine against transformers' generate on one workload",
        description=(
            "Useful output tokens/s of our continuous batching against transformers' generate "
            "(padded batches, and one by one), measured side by side in one run."
        ),
    )
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from bench.engine import run as run_bench

    return run_bench(args)
