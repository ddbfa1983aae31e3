"""Entry point of the `epd-serve` command.

Each subcommand lives in its own module with two functions: `add_parser(subparsers)` declares its
arguments, `run(args) -> int` does the work. Heavy imports (torch, transformers) happen inside `run`, so
`epd-serve --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under cli/
SUBCOMMANDS = {
    "make-tiny-model": "cli.make_tiny_model",
    "generate": "cli.generate",
    "bench-engine": "cli.bench_engine",
    "up": "cli.up",
    "serve": "cli.serve",
    "gateway": "cli.gateway",
    "health": "cli.health",
    "bench": "cli.bench",
    "bench-dataplane": "cli.bench_dataplane",
    "ask": "cli.ask",
    "keys": "cli.keys",
    "instances": "cli.admin",
    "drain": "cli.admin",
    "roles": "cli.admin",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epd-serve",
        description=(
            "Serve multimodal LLMs with the Encode, Prefill and Decode stages disaggregated. "
            "Run `epd-serve COMMAND --help` for the options of one command."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):  # a module may declare several commands
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
