"""Where a decode instance lets a data plane write the KV of a prompt computed elsewhere.

In place (CPU hosts): the engine's pool itself lives in data-plane memory (shared memory, registered
memory), so prefill writes each block straight into the block the request will decode from; nothing
is copied on this side.

Staged (accelerators, or any pool the data plane cannot write): the pool is the engine's own (device)
memory, and the data plane writes into a host staging area of blocks laid out like a pool
(`kv_cache.block_offset` addresses both). Once every byte of a request is in, its staging blocks are
copied into the pool blocks the engine reserved, in one gather and one scatter per step of the copy,
and the staging blocks are free for the next request. The staging area is smaller than the pool: it
only holds prompts in flight, and a request waits in the backlog until both have room.
"""

from __future__ import annotations

from typing import Any

import torch

from services.engine.kv_cache import KVCache


class InPlaceLanding:
    """The pool is data-plane memory: a request lands in its own pool blocks."""

    staged = False

    def __init__(self, kv: KVCache) -> None:
        self.num_blocks = kv.num_blocks

    def reserve(self, request_id: str, pool_blocks: list[int]) -> list[int] | None:
        return pool_blocks

    def land(self, request_id: str, pool_blocks: list[int]) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


class StagedLanding:
    """A host staging area in data-plane memory, copied into the engine's private pool on arrival."""

    staged = True

    def __init__(self, kv: KVCache, dataplane: Any, num_blocks: int, buffer_id: str = "kv") -> None:
        layout = kv.layout
        shape = (layout.num_layers, 2, num_blocks, kv.block_size, layout.num_kv_heads, layout.head_dim)
        nbytes = kv.block_bytes * layout.num_layers * 2 * num_blocks
        raw = torch.frombuffer(dataplane.allocate(buffer_id, nbytes), dtype=torch.uint8)
        self.area = raw.view(layout.dtype).view(shape)
        self.kv = kv
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # handed out lowest first: runs stay consecutive
        self._held: dict[str, list[int]] = {}

    def reserve(self, request_id: str, pool_blocks: list[int]) -> list[int] | None:
        """Staging blocks for a request whose pool blocks are reserved; None when the area is full."""
        n = len(pool_blocks)
        if n > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n)]
        self._held[request_id] = blocks
        return blocks

    def land(self, request_id: str, pool_blocks: list[int]) -> None:
        """Every byte is in: copy the staging blocks into the pool blocks, free the staging blocks."""
        staging = self._held.pop(request_id)
        src = torch.tensor(staging)
        dst = torch.tensor(pool_blocks, device=self.kv.device)
        pool = self.kv.pool  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        pool.index_copy_(2, dst, self.area.index_select(2, src).to(pool.device))  # done before reuse
        self._free.extend(reversed(staging))

    def release(self, request_id: str) -> None:
        """The request ended before landing (abort, failure): its staging blocks are free again."""
        self._free.extend(reversed(self._held.pop(request_id, [])))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)
