"""`epd-serve serve`: one stage process, started by hand (or by `up`, or by a compose file)."""

from __future__ import annotations

import argparse
import sys

from cli.engine_options import add_engine_arguments
from cli.key_options import add_key_arguments, resolve_keys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run one stage process (some of E, P, D) that registers with a gateway",
        description=(
            "Start one process hosting the given roles of the model and register it with the gateway's "
            "control address. Start as many as you like: each registers itself, nothing is wired by hand."
        ),
    )
    p.add_argument("--roles", required=True, help="roles this process hosts: E, P, D or a mix (EP, PD, EPD)")
    p.add_argument(
        "--gateway", required=True, metavar="ADDR", help="the gateway's control address, tcp://HOST:PORT"
    )
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument(
        "--dataplane",
        default="auto",
        help="auto (default: cudaipc for CUDA devices, else shm, on one host), shm, tcp, cudaipc, torchdist, mooncake, nixl",
    )
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, cuda:N, npu, or auto (cuda when one is visible, else cpu)")  # fmt: skip
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on cpu, else bfloat16)")
    p.add_argument("--bind-host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--advertise-host", default="", help="name peers reach this process by (default: the "
                   "bind address, or the hostname when binding 0.0.0.0)")  # fmt: skip
    p.add_argument("--instance-id", default="", help="a name for this instance; {hostname} is replaced "
                   "by this host's name, e.g. decode-{hostname} (default: generated)")  # fmt: skip
    add_engine_arguments(p, stack=False)
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests decoding at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--threads", type=int, help="torch threads of this process (default: torch's)")
    p.add_argument("--cpus", help="pin this process to these CPUs, e.g. 0 or 0-3 or 0,2")
    p.add_argument("--compute-nice", type=int, metavar="N",
                   help="niceness of the compute threads, below this process's I/O thread and the "
                   "gateway get a core at once while a step runs (0-19; default: 5 on cpu, 0 otherwise)")  # fmt: skip
    add_key_arguments(p)
    p.set_defaults(run=run)


def parse_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def resolve_device(device: str) -> str:
    """`auto` -> cuda when torch sees a CUDA device, else cpu (npu is only used when asked for: its
    runtime changes how torch imports); anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    import os

    from cli.health import expand_instance_id
    from services.host import HostConfig, serve

    if args.cpus:
        os.sched_setaffinity(0, parse_cpus(args.cpus))
    kv_bytes = None if args.kv_cache_memory is None else args.kv_cache_memory * 2**20
    args.insecure = args.insecure or os.environ.get("EPD_INSECURE") == "1"  # a child of `up --insecure`
    keys = resolve_keys(args, "epd-serve serve")
    try:
        config = HostConfig(
            roles=args.roles, model_dir=args.model, gateway_address=args.gateway, dataplane=args.dataplane,
            device=resolve_device(args.device), dtype=args.dtype, bind_host=args.bind_host,
            advertise_host=args.advertise_host, instance_id=expand_instance_id(args.instance_id),
            kv_cache_memory=kv_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
            attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
            stage_kv={"auto": None, "on": True, "off": False}[args.kv_staging],
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, swap_space_bytes=int(args.swap_space * 2**30),
            threads=args.threads, keys=keys, enable_prefix_caching=args.enable_prefix_caching,
            encoder_dtype=None if args.encoder_dtype == "auto" else args.encoder_dtype,
            encode_batch_tokens=args.encoder_batch_tokens, linear_backend=args.linear_backend,
            encoder_thread=args.encoder_thread, compute_nice=args.compute_nice,
        )  # fmt: skip
    except ValueError as exc:
        print(f"epd-serve serve: error: {exc}", file=sys.stderr)
        return 2
    return serve(config)
