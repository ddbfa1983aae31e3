"""Pick an attention backend by name; `auto` by device (the measurements are in docs/engine.md)."""

from __future__ import annotations

import torch

from services.engine.attention.base import AttentionBackend
from services.engine.kv_cache import KVCache

BACKEND_NAMES = ("auto", "sdpa", "flex")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend `name` means on `device`: `auto` is flex on CUDA (a paged kernel compiled through
    Triton) and sdpa elsewhere (CPU, where gathering small contexts is cheap, and NPU until a paged NPU
    kernel exists)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    device_type = torch.device(device).type
    if name == "auto":
        return "flex" if device_type == "cuda" else "sdpa"
    if name == "flex" and device_type not in ("cuda", "cpu"):
        raise ValueError(f"the flex attention backend runs on cuda and cpu, not {device_type}; use sdpa")
    return name


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
    resolved = resolve_backend(name, kv.device)
    if resolved == "flex":
        from services.engine.attention.flex import FlexBackend

        return FlexBackend(kv, max_num_tokens, max_num_seqs, max_model_len, compile=compile)
    from services.engine.attention.sdpa import SdpaBackend

    return SdpaBackend(kv)
