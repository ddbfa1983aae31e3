"""`epd-serve make-tiny-model`: write a random-weight checkpoint for tests, demos and benchmarks.

The heavy imports (torch, transformers) happen in `run`, so `epd-serve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

# services.models.tiny imports torch and transformers only inside its functions: cheap to import here.
from services.models.tiny import FAMILIES, PRESETS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "make-tiny-model",
        help="write an offline random-weight checkpoint (no download needed)",
        description=(
            "Build a Qwen2-VL-style checkpoint with random weights, a locally trained tokenizer and "
            "the PIL image processor, loadable with transformers' from_pretrained. The same family, "
            "preset and seed always give byte-identical files. Presets: tiny (about 0.3M parameters, "
            "for unit tests), small (about 23M), mid (about 0.57B, 2.2 GB on disk)."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must be absent or empty)")
    parser.add_argument(
        "--family", choices=FAMILIES, default="qwen2_vl", help="model family (default: %(default)s)"
    )
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="model size (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed for the weights (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from services.models.tiny import make_tiny_model, parameter_count

    try:
        out = make_tiny_model(
            args.family,
            args.out_dir,
            preset=args.preset,
            seed=args.seed,
            progress=True,
            overwrite=args.overwrite,
        )
    except FileExistsError as exc:
        print(f"epd-serve make-tiny-model: error: {exc}; use --overwrite to replace it", file=sys.stderr)
        return 2
    print(out)
    print(f"{parameter_count(out):,} parameters")
    return 0
