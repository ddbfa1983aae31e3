"""The paged KV pool of one engine and the host copies of KV that leave it.

One tensor holds everything: `[layers, 2 (key, value), num_blocks, block_size, kv_heads, head_dim]`,
layer-major so that one layer's blocks can be shipped while the next layer computes. Because it is a
single buffer, a data plane can place it wherever it likes (shared memory, registered RDMA memory) and
hand it in.

Exports are token-major (`[layers, 2, num_tokens, kv_heads, head_dim]`): independent of block size and
block ids, they are what a swapped-out sequence keeps in host memory. (A prefill stage hands its KV to
a decode stage block by block, at the offsets `block_offset` defines, straight into the decode pool.)

The pool's last block is a scratch block no sequence owns: rows a step is padded with (static shapes
for compiled kernels and CUDA graphs) write their keys and values there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def token_bytes(self) -> int:
        """Bytes of KV one token takes across all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def export_shape(self, num_tokens: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)


def block_offset(layer: int, kind: int, block: int, num_blocks: int, block_bytes: int) -> int:
    """Byte offset of the keys (kind 0) or values (kind 1) of `block` of `layer` in a pool buffer of
    `num_blocks` blocks: the contract between a decode instance's pool and the prefill writing it."""
    return ((layer * 2 + kind) * num_blocks + block) * block_bytes


class KVCache:
    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        buffer: torch.Tensor | None = None,
    ) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (layout.num_layers, 2, num_blocks, block_size, layout.num_kv_heads, layout.head_dim)
        if buffer is None:
            buffer = torch.zeros(shape, dtype=layout.dtype, device=device)
        elif tuple(buffer.shape) != shape or buffer.dtype != layout.dtype:
            raise ValueError(f"KV buffer has shape {tuple(buffer.shape)}/{buffer.dtype}, expected {shape}")
        self.pool = buffer
        # per layer: flat views [num_blocks * block_size, kv_heads, head_dim] that slots index
        self._flat = [
            (buffer[i, 0].view(-1, *shape[-2:]), buffer[i, 1].view(-1, *shape[-2:]))
            for i in range(layout.num_layers)
        ]
        self._blocks = [(buffer[i, 0], buffer[i, 1]) for i in range(layout.num_layers)]

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's keys (or values)."""
        return self.pool[0, 0, 0].numel() * self.pool.element_size()

    @property
    def scratch_slot(self) -> int:
        """The pool's last slot, where padding rows of a step write their keys and values. The engine
        keeps the last block out of its block manager, so no sequence ever reads it."""
        return self.num_blocks * self.block_size - 1

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value slots of one layer: [num_blocks * block_size, kv_heads, head_dim] each."""
        return self._flat[index]

    def layer_blocks(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same memory as `layer`, by block: [num_blocks, block_size, kv_heads, head_dim] each."""
        return self._blocks[index]

    def slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Slot of each of the first `num_tokens` tokens of a sequence."""
        blocks = torch.tensor(block_table, dtype=torch.long)
        pos = torch.arange(num_tokens)
        return (blocks[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def export_tokens(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A host copy of the KV of the first `num_tokens` tokens, token-major."""
        slots = self.slots(block_table, num_tokens)
        flat = self.pool.view(self.layout.num_layers, 2, -1, self.layout.num_kv_heads, self.layout.head_dim)
        return flat.index_select(2, slots).cpu()

    def import_tokens(self, block_table: list[int], data: torch.Tensor) -> None:
        """Write a token-major export into the slots of `block_table`."""
        num_tokens = data.shape[2]
        expected = self.layout.export_shape(num_tokens)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV export has shape {tuple(data.shape)}, expected {expected}")
        slots = self.slots(block_table, num_tokens)
        flat = self.pool.view(self.layout.num_layers, 2, -1, self.layout.num_kv_heads, self.layout.head_dim)
        flat.index_copy_(2, slots, data.to(device=self.device, dtype=self.layout.dtype))


class HostSwapper:
    """Swaps sequences between the pool and host memory (the scheduler's `KVSwapper`)."""

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv

    def swap_out(self, seq: Sequence) -> None:
        seq.swapped_kv = self.kv.export_tokens(seq.block_table, seq.num_computed_tokens)

    def swap_in(self, seq: Sequence) -> None:
        if seq.swapped_kv is not None and seq.num_computed_tokens:
            self.kv.import_tokens(seq.block_table, seq.swapped_kv)
        seq.swapped_kv = None
