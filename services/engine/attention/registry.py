"""Pick an attention backend by name; `auto` by device (the measurements are in docs/engine.md)."""

from __future__ import annotations

import torch

from services.engine.attention.base import AttentionBackend
from services.engine.kv_cache import KVCache

BACKEND_NAMES = ("auto", "sdpa", "flex", "cpu")


def resolve_backend(name: str, device: torch.device | str, kv: KVCache | None = None) -> str:
    """The backend `name` means on `device`: `auto` is flex on CUDA (a paged kernel compiled through
    Triton), cpu on a CPU where the C kernel builds and takes the pool `kv` (when given), and sdpa
    elsewhere (NPU until a paged NPU kernel exists)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda":
            return "flex"
        if device_type == "cpu" and _cpu_kernel_fits(kv):
            return "cpu"
        return "sdpa"
    if name == "flex" and device_type not in ("cuda", "cpu"):
        raise ValueError(f"the flex attention backend runs on cuda and cpu, not {device_type}; use sdpa")
    if name == "cpu" and device_type != "cpu":
        raise ValueError(f"the cpu attention backend runs on a CPU, not {device_type}; use auto")
    return name


def _cpu_kernel_fits(kv: KVCache | None) -> bool:
    from services.engine.attention import cpu_kernel

    kernel = cpu_kernel.load()
    if kernel is None:
        return False
    if kv is None:
        return True
    layout = kv.layout
    return kernel.fits_pool(layout.dtype, layout.head_dim, kv.block_size)


def create_backend(
    name: str,
    kv: KVCache,
    *,
    max_num_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    compile: bool = True,
) -> AttentionBackend:
    """The backend for one engine's pool; `compile` False runs kernels eagerly (tests, debugging)."""
    resolved = resolve_backend(name, kv.device, kv)
    if resolved == "cpu":
        from services.engine.attention import cpu_kernel
        from services.engine.attention.cpu_paged import CpuPagedBackend

        kernel = cpu_kernel.load()
        if kernel is None:
            raise ValueError("the cpu attention kernel could not be built here (see the log); use sdpa")
        return CpuPagedBackend(kv, kernel)
    if resolved == "flex":
        from services.engine.attention.flex import FlexBackend

        return FlexBackend(kv, max_num_tokens, max_num_seqs, max_model_len, compile=compile)
    from services.engine.attention.sdpa import SdpaBackend

    return SdpaBackend(kv)
