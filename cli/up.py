"""`epd-serve up`: the whole stack on this machine, gateway plus one process per topology entry.

This process only supervises: the gateway is a child started as `epd-serve gateway ...` and every
stage process a child started as `epd-serve serve ...`, exactly the commands a compose file runs.
Children die with this process (even if it is killed with -9: they ask the kernel for a signal when
their parent dies), and a child that exits unexpectedly is started again: a crashed instance rejoins
by itself, and a crashed gateway comes back on the same ports with the same keys, where the running
stages rejoin it (cli/gateway_process.py). On accelerators each child sees only the device it is
placed on (`--devices`, `--devices-for`: cli/placement.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from cli.engine_options import add_engine_arguments
from cli.key_options import add_api_key_argument, add_key_arguments, api_key, resolve_keys
from cli.planner_options import add_planner_arguments, planner_config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "up",
        help="start the gateway and the stage processes of a topology on this machine",
        description=(
            "Start the OpenAI-compatible gateway and one process per entry of --topology, wait until "
            "every instance has registered, print where to send requests, and stop them all on Ctrl-C. "
            "Without --model, a tiny random-weight Qwen2-VL is built on first use (offline)."
        ),
    )
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument(
        "--topology", default="E1 P1 D1", help='processes and roles, e.g. "E1 P1 D1", "EP1 D1", "EPD1"'
    )
    p.add_argument(
        "--dataplane",
        default="auto",
        help="auto (default: cudaipc for CUDA devices, else shm, on one host), shm, tcp, cudaipc, torchdist, mooncake, nixl",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--control-port", type=int, default=0,
                   help="gateway control port (default: a free one, kept over gateway restarts)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, npu (which ones: --devices)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on cpu, else bfloat16)")
    add_engine_arguments(p, stack=True)
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests decoding at once per process")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one engine step: lower keeps decode steps short (TPOT) "
                   "while long prompts prefill in chunks")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    p.add_argument("--pin", action="store_true", help="pin each process to its own cores (round robin)")
    p.add_argument("--cpus", action="append", default=[], metavar="LIST",
                   help="CPUs of the n-th process, e.g. --cpus 0 --cpus 1 (repeat per process)")  # fmt: skip
    p.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                   help="folder clients may name local images from (repeatable; default: none)")  # fmt: skip
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for registration")
    p.add_argument("--no-restart", action="store_true",
                   help="do not restart a stage process or the gateway when it exits")  # fmt: skip
    add_api_key_argument(p)
    add_key_arguments(p, generates=True)
    add_planner_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from cli.placement import place
    from cli.stack import Stack, StackConfig, build_tiny_model
    from common.log import configure_logging
    from common.topology import parse_topology

    configure_logging("up")
    keys = resolve_keys(args, "epd-serve up", generate=True)
    try:
        topology = parse_topology(args.topology)
        planner = planner_config_from_args(args)
        # where each process goes is checked before anything is built or started
        place(topology.processes(), args.device, args.devices, args.devices_for, os.environ)
    except ValueError as exc:
        print(f"epd-serve up: error: {exc}", file=sys.stderr)
        return 2
    if args.model:
        from services.models.loader import ModelLoadError, read_model_type  # torch-free check

        try:
            read_model_type(args.model)
        except ModelLoadError as exc:
            print(f"epd-serve up: error: {exc}", file=sys.stderr)
            return 2
    model = args.model or build_tiny_model()
    n = topology.num_processes
    cores = os.cpu_count() or 1
    cpus = list(args.cpus)
    if args.pin and not cpus:
        per = max(1, cores // n)
        cpus = [",".join(str((i * per + k) % cores) for k in range(per)) for i in range(n)]
    config = StackConfig(
        model_dir=model, topology=topology, dataplane=args.dataplane, host=args.host, port=args.port,
        control_port=args.control_port, device=args.device, dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        kv_staging=args.kv_staging,
        devices=args.devices, devices_for=args.devices_for, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        swap_space=args.swap_space, enable_prefix_caching=args.enable_prefix_caching,
        encoder_dtype=args.encoder_dtype, encoder_batch_tokens=args.encoder_batch_tokens,
        linear_backend=args.linear_backend, encoder_thread=args.encoder_thread,
        threads=args.threads or max(1, cores // n), cpus=cpus,
        allowed_local_media_dirs=args.allowed_local_media_path, ready_timeout=args.ready_timeout,
        restart=not args.no_restart, keys=keys, insecure=keys is None, api_key=api_key(args),
        gateway_process=True, planner=planner,
    )  # fmt: skip
    return asyncio.run(Stack(config).serve_forever())
