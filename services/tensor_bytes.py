"""Tensors as raw bytes and back, for the data plane (never pickle)."""

from __future__ import annotations

import torch


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def byte_view(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (the tensor must outlive the view's use)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def tensor_from_bytes(buf, dtype: str, shape: list[int], copy: bool = True) -> torch.Tensor:
    """A tensor of `dtype` and `shape` over `buf`; with `copy`, independent of `buf` afterwards."""
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    t = raw.view(getattr(torch, dtype)).view(shape)
    return t.clone() if copy else t
