"""`epd-serve keys DIR`: make the key pair every process of one stack holds (CurveZMQ)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.stack_keys import KEY_FILE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "keys",
        help="make a stack's key pair (every process of the stack must hold it)",
        description=(
            "Write a new CurveZMQ key pair into DIR: stack.key_secret (owner-only; every gateway and "
            "stage process of the stack reads it through --keys DIR or EPD_KEYS=DIR) and stack.key (the "
            "public half). Processes without it can never connect to the stack. See docs/security.md."
        ),
    )
    p.add_argument("dir", help="folder to write the keys into (created if missing)")
    p.add_argument("--force", action="store_true", help="replace keys already in DIR (default: refuse)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.stack_keys import StackKeys

    if (Path(args.dir) / KEY_FILE).exists() and not args.force:
        print(
            f"epd-serve keys: error: {Path(args.dir) / KEY_FILE} exists; --force replaces it", file=sys.stderr
        )
        return 2
    path = StackKeys.generate().write(args.dir)
    print(f"stack keys written to {path} (pass --keys {args.dir} or EPD_KEYS={args.dir} to every process)")
    return 0
