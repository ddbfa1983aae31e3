"""`epd-serve gateway`: the gateway alone; stage processes (`epd-serve serve`) join it by themselves.

This is what a container deployment runs: one gateway service, and any number of encode, prefill and
decode services pointed at its control address. `epd-serve up` runs it as a child too, and starts it
again when it exits (cli/gateway_process.py): stages rejoin a restarted gateway by themselves.
"""

from __future__ import annotations

import argparse
import sys

from cli.key_options import add_api_key_argument, add_key_arguments, api_key
from cli.planner_options import add_planner_arguments, planner_config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gateway",
        help="run the OpenAI gateway alone; stage processes register with it",
        description=(
            "Serve the OpenAI API and accept stage instances on the control port. /health answers 503 "
            "until every stage has a live instance."
        ),
    )
    p.add_argument("--model", required=True, help="checkpoint folder (tokenizer, chat template, config)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--control-host", default="", help="control address to bind (default: --host)")
    p.add_argument(
        "--control-port", type=int, default=5555, help="control port stages connect to (default 5555)"
    )
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                   help="folder clients may name local images from (repeatable)")  # fmt: skip
    p.add_argument("--no-banner", action="store_true",
                   help="do not print where to send requests once up (for a supervisor that prints its own)")  # fmt: skip
    add_api_key_argument(p)
    add_key_arguments(p)
    add_planner_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from cli.key_options import resolve_keys
    from cli.stack import Stack, StackConfig
    from common.log import configure_logging
    from services.models.loader import ModelLoadError, read_model_type  # torch-free check

    configure_logging("gateway")
    args.insecure = args.insecure or os.environ.get("EPD_INSECURE") == "1"  # a child of `up --insecure`
    keys = resolve_keys(args, "epd-serve gateway")
    try:
        read_model_type(args.model)
        planner = planner_config_from_args(args)
    except (ModelLoadError, ValueError) as exc:
        print(f"epd-serve gateway: error: {exc}", file=sys.stderr)
        return 2
    config = StackConfig(
        model_dir=args.model, topology=None, host=args.host, port=args.port,
        control_host=args.control_host or args.host, control_port=args.control_port,
        max_model_len=args.max_model_len, allowed_local_media_dirs=args.allowed_local_media_path,
        keys=keys, insecure=keys is None, api_key=api_key(args), banner=not args.no_banner,
        planner=planner,
    )  # fmt: skip
    return asyncio.run(Stack(config).serve_forever())
