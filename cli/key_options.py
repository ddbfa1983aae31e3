"""The flags that say where a process finds its stack's keys, shared by `serve`, `gateway` and `up`."""

from __future__ import annotations

import argparse
import os
import sys

from common.stack_keys import ENV_DIR, ENV_PUBLIC, ENV_SECRET, KeysError, StackKeys

ENV_API_KEY = "EPD_API_KEY"


def add_key_arguments(p: argparse.ArgumentParser, *, generates: bool = False) -> None:
    default = (
        "a fresh key pair for this stack, handed to its processes"
        if generates
        else f"${ENV_DIR}, else ${ENV_PUBLIC} and ${ENV_SECRET}"
    )
    p.add_argument(
        "--keys", metavar="DIR",
        help=f"the stack's keys (a folder made by `epd-serve keys`; default: {default}). Every socket "
        "between the stack's processes is authenticated and encrypted with them (docs/security.md)",
    )  # fmt: skip
    p.add_argument(
        "--insecure", action="store_true",
        help="run without keys: any process that reaches the control port can join the stack "
        "(only on a network nobody else can reach; default: off)",
    )  # fmt: skip


def add_api_key_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key", metavar="KEY",
        help=f"clients must send `Authorization: Bearer KEY` on /v1 routes, as with vLLM's --api-key "
        f"(default: ${ENV_API_KEY}, else no check)",
    )  # fmt: skip


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(ENV_API_KEY) or None


def resolve_keys(args: argparse.Namespace, prog: str, *, generate: bool = False) -> StackKeys | None:
    """The keys the flags and environment name; None with --insecure. Exits with a usage error when
    none are found (and `generate` is off) or they cannot be read."""
    if args.insecure:
        print(f"{prog}: warning: --insecure: the stack accepts any process as a member", file=sys.stderr)
        return None
    try:
        keys = StackKeys.load(args.keys) if args.keys else StackKeys.from_environment()
    except KeysError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    if keys is None and generate:
        return StackKeys.generate()
    if keys is None:
        raise SystemExit(
            f"{prog}: error: no stack keys: make them with `epd-serve keys DIR` and pass --keys DIR (or "
            f"set {ENV_DIR}), or run with --insecure on a private network"
        )
    return keys
