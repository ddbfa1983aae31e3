"""Paged KV cache bookkeeping on plain ints, with prefix caching.

The KV pool is `num_blocks` blocks of `block_size` token slots each. A sequence owns the blocks listed
in its block table, in order; token `i` of the sequence lives in slot
`block_table[i // block_size] * block_size + i % block_size`. Nothing here touches a tensor: the model
runner turns block tables into slot mappings.

Prefix caching (vLLM's automatic prefix caching, on plain ints): every full block a sequence has
computed is registered under its content key (`prefix_hash.py`). Blocks are reference-counted; one
whose count drops to zero is free, but keeps its KV and its key until the pool hands it out again, so
a later prompt with the same prefix (a system prompt, the same image) attaches those blocks instead of
computing them. Free blocks are handed out least recently freed first, blocks without a key before
cached ones, and a sequence's blocks are freed tail first, so a shared prefix outlives the tails that
follow it. Only full blocks are ever shared, and at least the prompt's last token is always
computed (its logits give the first output token), so no shared block is ever written.
"""

from __future__ import annotations

from collections import OrderedDict

from services.engine.prefix_hash import BlockKey, block_keys
from services.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head: next out
        self._refs = [0] * num_blocks
        self._by_key: dict[BlockKey, int] = {}
        self._key_of: dict[int, BlockKey] = {}
        self.query_tokens = 0  # prompt tokens of admitted prompts, and those found in the cache
        self.hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reused on demand)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_key)

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
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            key = self._key_of.pop(block, None)
            if key is not None:  # its cached KV is about to be overwritten
                del self._by_key[key]
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Let go of every block of `seq` (tail first); safe to call twice."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._key_of:  # nothing to keep: hand it out before cached blocks
                    self._free.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ---- prefix caching ----------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks holding the longest cached prefix of `seq`'s tokens, leaving at least its last
        token to compute. Nothing is taken: `attach` does that."""
        if not self.caching or not seq.cacheable:
            return []
        most = (seq.num_tokens - 1) // self.block_size
        seq.block_keys = block_keys(seq.token_ids, self.block_size, seq.mm_starts, seq.block_keys, most)
        hits = []
        for key in seq.block_keys[:most]:
            block = self._by_key.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def attach(self, seq: Sequence, blocks: list[int]) -> None:
        """Make cached `blocks` the start of `seq`'s (empty) block table."""
        assert not seq.block_table, "attach to a sequence holding no blocks"
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        seq.block_table = list(blocks)
        seq.num_registered_blocks = len(blocks)

    def cache_blocks(self, seq: Sequence) -> None:
        """Register the full blocks `seq` has computed since the last call, under their keys."""
        if not self.caching or not seq.cacheable:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        seq.block_keys = block_keys(seq.token_ids, self.block_size, seq.mm_starts, seq.block_keys, full)
        for i in range(seq.num_registered_blocks, full):
            key, block = seq.block_keys[i], seq.block_table[i]
            if key not in self._by_key and block not in self._key_of:
                self._by_key[key] = block
                self._key_of[block] = key
        seq.num_registered_blocks = full
