"""`flex`: FlexAttention straight over the paged block pool, the whole packed step in one call per layer.

The keys of a layer are its whole pool seen as one long sequence (`[1, KVH, blocks * block_size, D]`, a
view: nothing is copied). Which keys a row may see is said twice, coarsely and exactly:
  - a block mask (`BlockMask.from_kv_blocks`) lists, for every group of 16 rows, the pool blocks of the
    sequences those rows belong to, so the kernel only visits those blocks;
  - a mask function says, per (row, key slot): the slot's block belongs to the row's sequence (the block
    owner table) and its position in the sequence is not after the row's (causality).
Blocks are owned by one sequence at a time (no prefix sharing yet), so a per-block owner is enough.

Every per-step tensor lives in a buffer allocated once and overwritten by `prepare`: the compiled
kernel sees the same shapes for every step of a size bucket, and a CUDA graph captured over a decode
step stays valid after the next `prepare`. Steps are padded to buckets (16, 32, ... 512, then multiples
of 512 rows) so the kernel compiles once per bucket, not once per step size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from services.engine.attention.base import AttentionBackend, StepLayout
from services.engine.kv_cache import KVCache

Q_BLOCK = 16  # rows per block-mask group
_PAD_CHUNK = -2  # chunk id of padding rows: no block is owned by it (free blocks are owned by -1)

_compiled: Any = None


def _compiled_flex() -> Any:
    """One compiled FlexAttention for the process (static shapes: one compilation per bucket)."""
    global _compiled
    if _compiled is None:
        # each bucket is a recompilation of the same function; allow enough of them
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def bucket(num_tokens: int) -> int:
    """Rows a step of `num_tokens` is padded to: powers of two from 16 up to 512, then multiples of 512."""
    if num_tokens <= 512:
        return max(Q_BLOCK, 1 << (max(num_tokens, 1) - 1).bit_length())
    return -(-num_tokens // 512) * 512


class FlexBackend(AttentionBackend):
    name = "flex"
    graph_safe = True

    def __init__(self, kv: KVCache, max_num_tokens: int, max_model_len: int, compile: bool = True) -> None:
        super().__init__(kv)
        self.compile = compile
        nb, bs, device = kv.num_blocks, kv.block_size, kv.device
        self.max_padded = bucket(max_num_tokens)
        groups = -(-self.max_padded // Q_BLOCK)
        # A group's block list can hold every block of 16 sequences; inductor's CPU kernel wants the
        # list as wide as the whole key length, so on CPU it spans the pool.
        per_seq = -(-max_model_len // bs)
        self.width = nb if device.type == "cpu" else min(nb, Q_BLOCK * per_seq)
        i32 = {"dtype": torch.int32, "device": device}
        self._chunk = torch.full((self.max_padded,), _PAD_CHUNK, **i32)
        self._pos = torch.zeros(self.max_padded, **i32)
        self._owner = torch.full((nb,), -1, **i32)
        self._logical = torch.zeros(nb, **i32)
        self._kv_indices = torch.zeros(groups, self.width, **i32)
        self._kv_num = torch.zeros(groups, **i32)
        self._masks: dict[int, BlockMask] = {}

    def padded_tokens(self, num_tokens: int) -> int:
        return bucket(num_tokens) if self.compile else num_tokens

    # ---- per step --------------------------------------------------------------------------------

    def prepare(self, layout: StepLayout) -> BlockMask:
        bs = self.kv.block_size
        t = layout.padded_tokens
        groups = -(-t // Q_BLOCK)
        table = layout.block_table  # [C, W]
        width = table.shape[1]
        chunk = layout.token_chunk
        pos = layout.token_pos

        # who owns each block of the step, and where in its sequence the block sits
        context = torch.tensor(layout.chunk_starts, dtype=torch.long) + torch.tensor(
            layout.chunk_lens, dtype=torch.long
        )
        cols = torch.arange(width)
        used = cols[None, :] < (-(-context // bs))[:, None]  # [C, W]
        blocks = table[used]
        owners = torch.arange(layout.num_chunks)[:, None].expand_as(table)[used]
        logical = cols[None, :].expand_as(table)[used]
        self._owner.fill_(-1)
        self._owner[blocks.to(self.kv.device)] = owners.to(self._owner)
        self._logical[blocks.to(self.kv.device)] = logical.to(self._logical)

        # the blocks each group of Q_BLOCK rows needs: its rows' blocks up to their positions, deduplicated
        real = chunk >= 0
        rows = torch.full((groups * Q_BLOCK, width), -1, dtype=torch.long)
        picked = table[chunk[real]]
        needed = cols[None, :] <= (pos[real] // bs)[:, None]
        rows[: chunk.shape[0]][real] = torch.where(needed, picked, -1)
        rows = rows.view(groups, -1).sort(dim=1, descending=True).values
        repeat = torch.zeros_like(rows, dtype=torch.bool)
        repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
        rows = rows.masked_fill(repeat, -1).sort(dim=1, descending=True).values[:, : self.width]
        counts = (rows >= 0).sum(dim=1)
        n = rows.shape[1]
        self._kv_indices[:groups, :n].copy_(rows.clamp(min=0), non_blocking=True)
        self._kv_num[:groups].copy_(counts, non_blocking=True)

        self._chunk[:t].copy_(torch.where(real, chunk, _PAD_CHUNK), non_blocking=True)
        self._pos[:t].copy_(pos, non_blocking=True)
        return self._block_mask(t)

    def _block_mask(self, t: int) -> BlockMask:
        mask = self._masks.get(t)
        if mask is None:
            bs = self.kv.block_size
            owner, logical, chunk, pos = self._owner, self._logical, self._chunk, self._pos

            def same_sequence_causal(b, h, q, kv):
                block = kv // bs
                return (owner[block] == chunk[q]) & (logical[block] * bs + kv % bs <= pos[q])

            groups = -(-t // Q_BLOCK)
            mask = BlockMask.from_kv_blocks(
                self._kv_num[None, None, :groups],
                self._kv_indices[None, None, :groups],
                BLOCK_SIZE=(Q_BLOCK, bs),
                mask_mod=same_sequence_causal,
                seq_lengths=(t, self.kv.num_blocks * bs),
                compute_q_blocks=False,
            )
            self._masks[t] = mask
        return mask

    # ---- per layer -------------------------------------------------------------------------------

    def attend(self, state: BlockMask, layer, query, key, value, scaling) -> torch.Tensor:
        k_blocks, v_blocks = self.kv.layer_blocks(layer)
        nb, bs, kvh, d = k_blocks.shape
        k = k_blocks.view(1, nb * bs, kvh, d).transpose(1, 2)
        v = v_blocks.view(1, nb * bs, kvh, d).transpose(1, 2)
        fn = _compiled_flex() if self.compile else flex_attention
        out = fn(query, k, v, block_mask=state, scale=scaling, enable_gqa=True)
        return out[0].transpose(0, 1)
