"""Attention for the engine's packed steps, behind one interface with one file per backend.

transformers' decoder layers call one registered attention function (`epd_paged`, in `paged.py`); it
writes the step's new keys and values into the block pool and hands the attention itself to the
backend the engine chose:

  sdpa   (`sdpa.py`)      the reference: PyTorch SDPA over blocks gathered per step; every device
  cpu    (`cpu_paged.py`) decode rows through a C kernel (`csrc/paged_decode.c`, built by
                          `cpu_kernel.py`) that reads their blocks in place; prefill chunks as sdpa
  flex   (`flex.py`)      FlexAttention straight over the block pool through a block mask built from
                          the block tables: no gathered copy, the whole packed step in one call per layer

`auto` picks flex on CUDA, cpu on a CPU where the kernel builds, and sdpa elsewhere (see
docs/engine.md and docs/benchmarks.md for the measurements behind it).
"""

from services.engine.attention.base import AttentionBackend, AttentionMetadata, StepLayout
from services.engine.attention.paged import PAGED_ATTENTION, paged_attention, register_paged_attention
from services.engine.attention.registry import BACKEND_NAMES, create_backend, resolve_backend

__all__ = [
    "BACKEND_NAMES",
    "PAGED_ATTENTION",
    "AttentionBackend",
    "AttentionMetadata",
    "StepLayout",
    "create_backend",
    "paged_attention",
    "register_paged_attention",
    "resolve_backend",
]
