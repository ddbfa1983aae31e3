"""Paged KV cache bookkeeping on plain ints.

The KV pool is `num_blocks` blocks of `block_size` token slots each. A sequence owns the blocks listed
in its block table, in order; token `i` of the sequence lives in slot
`block_table[i // block_size] * block_size + i % block_size`. Nothing here touches a tensor: the model
runner turns block tables into slot mappings.
"""

from __future__ import annotations

from collections import deque

from services.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token slots."""
        return -(-num_tokens // self.block_size)

    def blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_to_grow(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` slots for its first `num_tokens` tokens. Call `can_grow` first."""
        needed = self.blocks_to_grow(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"{seq.request_id}: needs {needed} blocks, {len(self._free)} free")
        seq.block_table.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` to the pool; safe to call twice."""
        self._free.extend(seq.block_table)
        seq.block_table = []
