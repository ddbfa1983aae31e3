"""What one stage process hosts and how: its roles, model, engine sizes and where it listens.

One dataclass with defaults and checks; `epd-serve serve` fills it from its flags (cli/serve.py).
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

from common.stack_keys import StackKeys


@dataclass(slots=True)
class HostConfig:
    roles: str  # e.g. "E", "PD", "EPD"
    model_dir: str
    gateway_address: str
    dataplane: str = "auto"
    device: str = "cpu"
    dtype: str | None = None
    bind_host: str = "127.0.0.1"
    advertise_host: str = ""  # how peers reach this process; default: bind_host, or the hostname for 0.0.0.0
    instance_id: str = ""
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: sized from the device (memory.py)
    gpu_memory_utilization: float = 0.9  # share of an accelerator's memory this process may use
    attention_backend: str = "auto"  # auto, sdpa, flex (services/engine/attention/)
    enforce_eager: bool = False  # no CUDA graphs, no compiled attention kernels (debugging)
    # decode only: land KV in a host staging area and copy it into a private pool (what a device pool
    # needs; None: on accelerators). On CPU False writes KV straight into a shared-memory pool.
    stage_kv: bool | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    swap_space_bytes: int = 4 << 30  # host memory for swapped-out KV per engine; 0: never swap
    enable_prefix_caching: bool = True  # share full KV blocks between prompts with the same prefix
    encoder_dtype: str | None = (
        None  # the encoder's own dtype (services/models/encoder_dtype.py); None: dtype
    )
    # CPU linear layers: auto and onednn pack their weights for oneDNN (onednn refuses a dtype it
    # cannot run), torch leaves them to F.linear (services/models/packed_linear.py)
    linear_backend: str = "auto"
    # E next to P: the encoder call on a thread of its own (services/encode/encoder_thread.py); auto:
    # on a CPU, off on accelerators
    encoder_thread: str = "auto"
    encode_cache_bytes: int = 512 * 2**20
    max_encode_batch: int = 16  # items of one encoder call
    encode_batch_tokens: int = 8192  # encoder output tokens of one encoder call (one item may be over)
    threads: int | None = None
    # niceness of the compute threads, below the I/O thread's (services/compute_priority.py);
    # None: 5 on a CPU, 0 on accelerators
    compute_nice: int | None = None
    keys: StackKeys | None = None  # the stack's CurveZMQ keys (common/stack_keys.py); None: insecure

    def __post_init__(self) -> None:
        roles = self.roles.upper()
        if not roles or set(roles) - set("EPD") or len(set(roles)) != len(roles):
            raise ValueError(f"roles must be some of E, P, D, each once; got {self.roles!r}")
        if "D" in roles and "P" not in roles and "E" in roles:
            raise ValueError("E and D without P in one process is not a useful co-location")
        self.roles = "".join(r for r in "EPD" if r in roles)
        if self.encoder_thread not in ("auto", "on", "off"):
            raise ValueError(f"encoder_thread must be auto, on or off; got {self.encoder_thread!r}")
        if self.compute_nice is not None and not 0 <= self.compute_nice <= 19:
            raise ValueError(f"compute_nice must be between 0 and 19; got {self.compute_nice}")
        if not self.advertise_host:
            wildcard = self.bind_host in ("0.0.0.0", "::", "*")
            self.advertise_host = socket.gethostname() if wildcard else self.bind_host
        self.instance_id = self.instance_id or f"{self.roles.lower()}-{uuid.uuid4().hex[:8]}"
