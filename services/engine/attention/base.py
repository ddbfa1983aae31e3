"""The contract between the model runner, the registered attention function and the backends.

The runner describes a packed step once, on the host, as a `StepLayout` (which rows belong to which
sequence, where each sequence's context lives in the pool); the chosen backend turns that into its own
per-step state (`prepare`, once per step), and every layer then calls `attend` with that state. Nothing
here is per layer, and nothing lives in module globals: two engines in one process do not interfere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.engine.kv_cache import KVCache


@dataclass(slots=True)
class StepLayout:
    """One packed step, on the host: rows `[0, decode_rows)` hold the `num_decodes` one-token decode
    rows, then padding; the prefill chunks' rows follow, then padding up to `padded_tokens`.

    Padding rows (static shapes for compiled kernels and CUDA graphs) belong to no sequence
    (`token_chunk` -1) and write their keys to the pool's scratch slot. A backend that needs no
    padding gets `decode_rows == num_decodes` and `padded_tokens == num_tokens`."""

    num_tokens: int  # real rows
    padded_tokens: int  # all rows
    num_decodes: int
    decode_rows: int  # rows of the decode part, padding included; the prefill rows start here
    chunk_starts: list[int]  # index of each chunk's first token within its sequence
    chunk_lens: list[int]
    block_table: torch.Tensor  # [chunks, width] long, the blocks of each chunk's sequence (0-padded)
    token_chunk: torch.Tensor  # [padded_tokens] long: chunk of each row, -1 for padding
    token_pos: torch.Tensor  # [padded_tokens] long: position of each row within its sequence

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_starts)

    def context_len(self, chunk: int) -> int:
        """Tokens of the sequence that a chunk's last row sees (its own included)."""
        return self.chunk_starts[chunk] + self.chunk_lens[chunk]


@dataclass(slots=True)
class AttentionMetadata:
    """What every layer of one step needs; passed as the `paged=` keyword through transformers."""

    kv: KVCache
    slot_mapping: torch.Tensor  # [padded_tokens] slot of every row's new key and value
    backend: AttentionBackend
    state: Any  # the backend's per-step state, from `prepare`
    # called with the layer index once that layer's new K/V are in the pool, before attending: a
    # prefill stage ships the layer to decode while the next layers compute
    on_layer: Callable[[int], None] | None = None


class AttentionBackend(ABC):
    name: str = ""
    # whether `prepare` writes only into buffers allocated once, so a decode step can be captured in a
    # CUDA graph and replayed after the next `prepare`
    graph_safe: bool = False

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv

    def padded_rows(self, num_decodes: int, num_prefill_tokens: int) -> tuple[int, int]:
        """Rows the decode part and the prefill part of a step are padded to (static shapes for
        compiled kernels and graphs); no padding by default."""
        return num_decodes, num_prefill_tokens

    @abstractmethod
    def prepare(self, layout: StepLayout) -> Any:
        """Per-step state shared by all layers, on the pool's device."""

    @abstractmethod
    def attend(
        self,
        state: Any,
        layer: int,
        query: torch.Tensor,  # [1, H, T, D], RoPE applied
        key: torch.Tensor,  # [1, KVH, T, D], this step's keys (already in the pool too)
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """Attention output [T, H, D] of every row of the step."""
