"""The engine and placement flags that `up`, `serve` and `bench` share, declared once.

`serve` runs one process, so its --gpu-memory-utilization is that process's share of its device
(as in vLLM). `up` and `bench` start several processes that may share a device, so theirs is the
share of each device that the processes placed on it use together: each gets an equal part.
Only argparse here: `epd-serve --help` builds every parser without importing torch.
"""

from __future__ import annotations

import argparse

from cli.placement import devices_arg, role_devices_arg

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "cpu")  # services/engine/attention/registry.py BACKEND_NAMES
CPU_KV_CACHE_MIB = 256  # what "auto" means on cpu
SWAP_SPACE_GIB = 4.0  # per engine, vLLM's default swap_space
ENCODER_BATCH_TOKENS = 8192  # services/host_config.py HostConfig.encode_batch_tokens


def kv_cache_mib(text: str) -> int | None:
    """'512' -> 512 (MiB); 'auto' -> None (sized from the device)."""
    if text.strip().lower() == "auto":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"bad --kv-cache-memory {text!r}: a whole number of MiB, or auto")
    return int(text)


def memory_fraction(text: str) -> float:
    """A share of device memory: 0 < F <= 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"bad --gpu-memory-utilization {text!r}: a fraction above 0 and at most 1, e.g. 0.9"
        )
    return value


def positive_tokens(text: str) -> int:
    """A token count: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"bad token count {text!r}: a whole number >= 1")
    return int(text)


def swap_gib(text: str) -> float:
    """GiB of host memory for swapped-out KV: a number >= 0 (0: never swap)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 2**20:  # NaN and inf fail this too
        raise argparse.ArgumentTypeError(
            f"bad --swap-space {text!r}: GiB of host memory, a number >= 0, e.g. 4"
        )
    return value


def add_engine_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, stack: bool) -> None:
    """--kv-cache-memory, --gpu-memory-utilization, --swap-space, --attention-backend, --linear-backend,
    --enforce-eager, --kv-staging; with `stack` (up, bench) the memory share is per device and
    --devices/--devices-for come too."""
    each = "per process, " if stack else ""
    p.add_argument("--kv-cache-memory", type=kv_cache_mib, default=None, metavar="MiB",
                   help=f"KV pool {each}in MiB, or auto (default auto: what the device has left under "
                        f"--gpu-memory-utilization on accelerators, {CPU_KV_CACHE_MIB} MiB on cpu)")  # fmt: skip
    if stack:
        share = ("share of each accelerator's memory for weights, activations and KV, split equally "
                 "among the processes placed on it")  # fmt: skip
    else:
        share = "share of the accelerator's memory this process may use for weights, activations and KV"
    p.add_argument("--gpu-memory-utilization", type=memory_fraction, default=0.9, metavar="F",
                   help=f"{share} (default 0.9; 0 < F <= 1)")  # fmt: skip
    p.add_argument("--swap-space", type=swap_gib, default=SWAP_SPACE_GIB, metavar="GiB",
                   help=f"host memory {'per process ' if stack else ''}for the KV of requests preempted "
                        "when the KV pool runs out, swapped back in later instead of recomputed; past "
                        "it a request is recomputed, or fails on a decode instance, which cannot "
                        f"recompute (default {SWAP_SPACE_GIB:g}, as vLLM; 0: never swap)")  # fmt: skip
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernels: auto (default: flex on CUDA, cpu on a CPU where a C compiler "
                        "builds it, sdpa elsewhere), sdpa (SDPA over gathered blocks, the reference), flex "
                        "(FlexAttention over the block pool), cpu (a C kernel reading decode rows' blocks "
                        "in place, compiled once per machine; prefill chunks as sdpa)")  # fmt: skip
    p.add_argument("--linear-backend", default="auto", choices=("auto", "onednn", "torch"),
                   help="CPU linear layers: auto (default) and onednn pack their weights once for "
                        "oneDNN's matmul (faster for decode and prefill rows than torch's BLAS call); "
                        "auto leaves a dtype oneDNN cannot run here to F.linear, onednn refuses it; "
                        "torch keeps F.linear. Accelerators always use torch's")  # fmt: skip
    p.add_argument("--encoder-thread", default="auto", choices=("auto", "on", "off"),
                   help="processes that encode and prefill (EPD1, EP1): run each encoder call on a thread "
                        "of its own while the engine keeps stepping, the process's threads shared between "
                        "the two, so running decodes do not wait for it; auto (default): on for cpu, off "
                        "on accelerators (their kernels queue behind the engine's anyway)")  # fmt: skip
    p.add_argument("--encoder-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the vision (or audio) encoder of processes that encode (default auto: "
                        "the --dtype of the rest); bfloat16 runs a CPU encoder about twice as fast "
                        "where the CPU has AMX or AVX-512 BF16, with a float32 language model")  # fmt: skip
    p.add_argument("--encoder-batch-tokens", type=positive_tokens, default=ENCODER_BATCH_TOKENS, metavar="N",
                   help="processes that encode: encoder output tokens of one encoder call; queued images, "
                        "videos and audio clips are encoded together up to this many (one item larger "
                        f"than it runs alone; default {ENCODER_BATCH_TOKENS})")  # fmt: skip
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the KV of full blocks after a request ends and share it with later prompts "
                        "that start the same way (a system prompt, the same image): their prefill "
                        "skips those tokens (default on, as vLLM; --no-enable-prefix-caching: off)")  # fmt: skip
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps and no compiled attention kernels, for "
                        "debugging (default: graphs and compiled kernels where the device has them)")  # fmt: skip
    p.add_argument("--kv-staging", default="auto", choices=("auto", "on", "off"),
                   help="decode processes: where prefill's KV lands. on: a host staging area, copied "
                        "into the engine's own pool on arrival (what a device pool needs); off: straight "
                        "into a shared-memory pool (CPU hosts, no copy); auto (default): on for "
                        "accelerators, off on cpu")  # fmt: skip
    if stack:
        p.add_argument("--devices", type=devices_arg, default=None, metavar="LIST",
                       help="accelerator indices the stage processes are placed on round-robin in "
                            "topology order, e.g. 0,1,2 (default 0: every process shares one device)")  # fmt: skip
        p.add_argument("--devices-for", type=role_devices_arg, action="append", default=[],
                       metavar="ROLES=LIST",
                       help="devices of the processes hosting exactly ROLES, round-robin, e.g. "
                            "--devices-for D=1,2 --devices-for EP=0 (repeatable; default: --devices)")  # fmt: skip
