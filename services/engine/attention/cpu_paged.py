"""`cpu`: decode rows attend straight over the block pool through a C kernel; prefill chunks as `sdpa`.

`sdpa` copies every decode row's context out of the pool each step and layer (an index_select of its
blocks) before attending, so its decode attention reads the context twice and writes it once; from a
batch of 8 on, that copy cost as much as the attention itself (docs/benchmarks.md). This backend hands
the rows' block tables to `csrc/paged_decode.c`, which reads each block where it lies, once. Prefill
chunks stay with SDPA's flash kernel: they are compute-bound, and a continued chunk's gather is paid
once for all its rows. It takes float32 and bfloat16 pools with head dims in multiples of 16 up to
256 and up to 32 query heads per KV head (every model we serve); `auto` picks it on a CPU wherever it
builds and fits the pool, and `sdpa` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.attention.base import StepLayout
from services.engine.attention.cpu_kernel import PagedDecodeKernel
from services.engine.attention.sdpa import SdpaBackend, SdpaState
from services.engine.kv_cache import KVCache


@dataclass(slots=True)
class CpuPagedState(SdpaState):
    decode_table: torch.Tensor | None = None  # [B, W] int32: each decode row's blocks
    decode_contexts: torch.Tensor | None = None  # [B] int32: keys each row attends to, its own included


class CpuPagedBackend(SdpaBackend):
    name = "cpu"
    state_type = CpuPagedState

    def __init__(self, kv: KVCache, kernel: PagedDecodeKernel) -> None:
        super().__init__(kv)
        if kv.device.type != "cpu":
            raise ValueError(f"the cpu attention backend runs on a CPU pool, not {kv.device.type}")
        layout = kv.layout
        if not kernel.fits_pool(layout.dtype, layout.head_dim, kv.block_size):
            raise ValueError(
                f"the cpu attention kernel takes float32 or bfloat16 pools, head dims in multiples of 16 "
                f"up to {kernel.max_head_dim} and blocks up to {kernel.max_block} tokens; use sdpa"
            )
        self.kernel = kernel

    def _prepare_decodes(self, state: CpuPagedState, layout: StepLayout) -> None:
        b, bs = layout.num_decodes, self.kv.block_size
        contexts = torch.tensor(layout.chunk_starts[:b], dtype=torch.int32) + 1
        width = -(-int(contexts.max()) // bs)
        state.decode_table = layout.block_table[:b, :width].to(torch.int32)
        state.decode_contexts = contexts

    def _attend_decodes(self, state: CpuPagedState, layer: int, query, scaling, out: torch.Tensor) -> None:
        b, head_dim = state.num_decodes, query.shape[3]
        k_blocks, v_blocks = self.kv.layer_blocks(layer)
        scale = scaling if scaling is not None else head_dim**-0.5
        rows = query[0, :, :b].transpose(0, 1)  # [B, H, D] view
        self.kernel(rows, k_blocks, v_blocks, state.decode_table, state.decode_contexts, scale, out[:b])
