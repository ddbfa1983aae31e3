"""`flex`: FlexAttention straight over the paged block pool, two calls per layer, no gathered copy.

The keys of a layer are its whole pool seen as one long sequence (`[1, KVH, blocks * block_size, D]`, a
view: nothing is copied). Which keys a row may see is said twice, coarsely and exactly:
  - a block mask (`BlockMask.from_kv_blocks`) lists the pool blocks a query tile must visit;
  - a mask function says, per (row, key slot): the slot's block is in the row's sequence (the step's
    block tables, looked up at the block's index within a sequence: with prefix caching a block may
    belong to several sequences, always at the same index, since only whole prefix blocks are shared)
    and its position in the sequence is not after the row's (causality).
The step runs as two calls:
  - decode rows, one per sequence, each its own batch entry (`[B, H, 1, D]` over the pool expanded
    along the batch, stride 0): each entry's block list is exactly its sequence's blocks, so a decode
    reads every block of its context once (FlexAttention's decoding kernel, GQA heads packed);
  - prefill rows, packed: for each tile of rows (16 on CPU, 64 on CUDA) the blocks of their sequences
    up to their positions (a tile rarely straddles two prompts). Packing decode rows this way would make each group read the
    blocks of 16 sequences: 16 times the KV traffic.

Every per-step tensor lives in a buffer allocated once and overwritten by `prepare`: the compiled
kernels see the same shapes for every step of a size bucket, and a CUDA graph captured over a decode
step stays valid after the next `prepare`. Both parts are padded to buckets (16, 32, ... 512, then
multiples of 512 rows), so each compiles once per bucket, not once per step size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from services.engine.attention.base import AttentionBackend, StepLayout
from services.engine.kv_cache import KVCache

Q_BLOCK = 16  # the smallest bucket, and the prefill tile on CPU
_CUDA_Q_BLOCK = 64  # the prefill tile on CUDA: query rows per kernel block (Triton's BLOCK_M)
_DECODE_Q_BLOCK = 128  # the decode part's one query tile: any multiple of the kernel's GQA packing

_compiled: Any = None


def _compiled_flex() -> Any:
    """One compiled FlexAttention for the process (static shapes: one compilation per bucket)."""
    global _compiled
    if _compiled is None:
        # each bucket is a recompilation of the same function; allow enough of them
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def bucket(rows: int) -> int:
    """Rows a part of `rows` rows is padded to: 0 stays 0; powers of two from 16 up to 512, then
    multiples of 512."""
    if rows <= 0:
        return 0
    if rows <= 512:
        return max(Q_BLOCK, 1 << (rows - 1).bit_length())
    return -(-rows // 512) * 512


@dataclass(slots=True)
class FlexState:
    decode_rows: int
    prefill_rows: int
    decode_mask: BlockMask | None
    prefill_mask: BlockMask | None


class FlexBackend(AttentionBackend):
    name = "flex"
    graph_safe = True

    def __init__(
        self,
        kv: KVCache,
        max_num_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        compile: bool = True,
        q_block: int | None = None,  # prefill rows per tile (default: 16 on CPU, 64 on CUDA)
    ) -> None:
        super().__init__(kv)
        self.compile = compile
        nb, bs, device = kv.num_blocks, kv.block_size, kv.device
        cpu = device.type == "cpu"
        self.q_block = q_block or (Q_BLOCK if cpu else _CUDA_Q_BLOCK)
        # Triton's kernel tiles must divide the block mask's: keys go by one pool block (BLOCK_N), the
        # prefill queries by one tile (BLOCK_M); inductor's CPU kernel picks its own
        self._prefill_options = None if cpu else {"BLOCK_M": self.q_block, "BLOCK_N": bs}
        self._decode_options = None if cpu else {"BLOCK_N": bs}
        max_decodes = bucket(min(max_num_seqs, max_num_tokens))
        max_prefill = bucket(max_num_tokens)
        groups = -(-max_prefill // self.q_block)
        per_seq = -(-max_model_len // bs)
        i32 = {"dtype": torch.int32, "device": device}
        # the step's block tables ([chunk, index in its sequence] -> block, -1 past its context), and a
        # last row for padding rows: they see the scratch block's first slot
        self._pad_row = max_num_seqs
        self._tables = torch.full((max_num_seqs + 1, per_seq), -1, **i32)
        self._logical = torch.zeros(nb, **i32)  # a block's index within the sequences holding it
        self._d_seq = torch.full((max_decodes,), self._pad_row, **i32)
        self._d_pos = torch.zeros(max_decodes, **i32)
        self._d_num = torch.zeros(max_decodes, **i32)
        # block lists: a sequence's blocks (decode), a tile's (prefill); inductor's CPU kernel wants
        # them as wide as the whole key length
        self._d_blocks = torch.zeros(max_decodes, nb if cpu else min(nb, per_seq), **i32)
        # no block is ever known to be wholly visible (every one goes through the mask function); on
        # CPU that is said explicitly, because inductor's C++ decoding kernel does not compile without
        # the lists of such blocks (torch 2.13)
        self._no_full = torch.zeros(max_decodes, **i32) if cpu else None
        self._no_full_blocks = torch.zeros(max_decodes, 1, **i32) if cpu else None
        self._p_seq = torch.full((max_prefill,), self._pad_row, **i32)
        self._p_pos = torch.zeros(max_prefill, **i32)
        self._p_num = torch.zeros(groups, **i32)
        self._p_blocks = torch.zeros(groups, nb if cpu else min(nb, self.q_block * per_seq), **i32)
        self._decode_masks: dict[int, BlockMask] = {}
        self._prefill_masks: dict[int, BlockMask] = {}

    def padded_rows(self, num_decodes: int, num_prefill_tokens: int) -> tuple[int, int]:
        if not self.compile:
            return num_decodes, num_prefill_tokens
        return bucket(num_decodes), bucket(num_prefill_tokens)

    # ---- per step --------------------------------------------------------------------------------

    def prepare(self, layout: StepLayout) -> FlexState:
        bs, dev = self.kv.block_size, self.kv.device
        table = layout.block_table  # [C, W]
        cols = torch.arange(table.shape[1])

        # each sequence's blocks of the step, and where in its sequence each block sits
        starts = torch.tensor(layout.chunk_starts, dtype=torch.long)
        context = starts + torch.tensor(layout.chunk_lens, dtype=torch.long)
        used = cols[None, :] < (-(-context // bs))[:, None]  # [C, W]
        blocks = table[used].to(dev, non_blocking=True)
        self._logical[blocks] = cols[None, :].expand_as(table)[used].to(self._logical)
        self._logical[-1] = 0
        tables = torch.full((self._tables.shape[0], table.shape[1]), -1, dtype=torch.long)
        tables[: layout.num_chunks] = torch.where(used, table, -1)
        tables[self._pad_row, 0] = self.kv.num_blocks - 1  # padding rows see the scratch block
        self._tables[:, : table.shape[1]].copy_(tables, non_blocking=True)
        self._tables[:, table.shape[1] :].fill_(-1)

        b, db = layout.num_decodes, layout.decode_rows
        pr = layout.padded_tokens - db
        if db:
            pos = torch.zeros(db, dtype=torch.long)
            pos[:b] = starts[:b]
            seq = torch.full((db,), self._pad_row, dtype=torch.long)
            seq[:b] = torch.arange(b)
            # padding entries see the scratch block's first slot: no row is ever fully masked (the one
            # case where kernels disagree: zeros, or NaN that a later layer would spread)
            num = torch.ones(db, dtype=torch.long)
            num[:b] = -(-context[:b] // bs)
            width = min(table.shape[1], self._d_blocks.shape[1])
            blocks = torch.full((db, width), self.kv.num_blocks - 1, dtype=torch.long)
            blocks[:b] = table[:b, :width]
            self._d_seq[:db].copy_(seq, non_blocking=True)
            self._d_pos[:db].copy_(pos, non_blocking=True)
            self._d_num[:db].copy_(num, non_blocking=True)
            self._d_blocks[:db, :width].copy_(blocks, non_blocking=True)
        if pr:
            self._prepare_prefill(layout, db, pr)
        return FlexState(
            db, pr, self._decode_mask(db) if db else None, self._prefill_mask(pr) if pr else None
        )

    def _prepare_prefill(self, layout: StepLayout, db: int, pr: int) -> None:
        """Block lists of the prefill part: per tile of rows, its rows' blocks up to their positions,
        deduplicated (sorted twice on the host; a tile rarely holds two prompts)."""
        bs, tile = self.kv.block_size, self.q_block
        table = layout.block_table
        cols = torch.arange(table.shape[1])
        chunk = layout.token_chunk[db : db + pr]
        pos = layout.token_pos[db : db + pr]
        groups = -(-pr // tile)
        real = chunk >= 0
        rows = torch.full((groups * tile, table.shape[1]), -1, dtype=torch.long)
        needed = cols[None, :] <= (pos[real] // bs)[:, None]
        rows[:pr][real] = torch.where(needed, table[chunk[real]], -1)
        rows = rows.view(groups, -1).sort(dim=1, descending=True).values
        repeat = torch.zeros_like(rows, dtype=torch.bool)
        repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
        rows = rows.masked_fill(repeat, -1).sort(dim=1, descending=True).values[:, : self._p_blocks.shape[1]]
        # every tile also visits the scratch block, so that its padding rows see a key (see above)
        counts = (rows >= 0).sum(dim=1)
        rows = torch.cat([rows, torch.full((groups, 1), -1, dtype=torch.long)], dim=1)
        rows[torch.arange(groups), counts] = self.kv.num_blocks - 1
        rows = rows[:, : self._p_blocks.shape[1]]
        counts = (counts + 1).clamp(max=rows.shape[1])
        self._p_blocks[:groups, : rows.shape[1]].copy_(rows.clamp(min=0), non_blocking=True)
        self._p_num[:groups].copy_(counts, non_blocking=True)
        self._p_seq[:pr].copy_(torch.where(real, chunk, self._pad_row), non_blocking=True)
        self._p_pos[:pr].copy_(pos, non_blocking=True)

    def _decode_mask(self, rows: int) -> BlockMask:
        mask = self._decode_masks.get(rows)
        if mask is None:
            bs = self.kv.block_size
            tables, logical, seq, pos = self._tables, self._logical, self._d_seq, self._d_pos

            def own_context(b, h, q, kv):
                block, index = kv // bs, logical[kv // bs]
                return (tables[seq[b], index] == block) & (index * bs + kv % bs <= pos[b])

            full = (None, None)
            if self._no_full is not None:
                full = (self._no_full[:rows, None, None], self._no_full_blocks[:rows, None, None])
            mask = BlockMask.from_kv_blocks(
                self._d_num[:rows, None, None], self._d_blocks[:rows, None, None], *full,
                BLOCK_SIZE=(_DECODE_Q_BLOCK, bs), mask_mod=own_context,
                seq_lengths=(1, self.kv.num_blocks * bs), compute_q_blocks=False,
            )  # fmt: skip
            self._decode_masks[rows] = mask
        return mask

    def _prefill_mask(self, rows: int) -> BlockMask:
        mask = self._prefill_masks.get(rows)
        if mask is None:
            bs = self.kv.block_size
            tables, logical, seq, pos = self._tables, self._logical, self._p_seq, self._p_pos

            def same_sequence_causal(b, h, q, kv):
                block, index = kv // bs, logical[kv // bs]
                return (tables[seq[q], index] == block) & (index * bs + kv % bs <= pos[q])

            groups = -(-rows // self.q_block)
            mask = BlockMask.from_kv_blocks(
                self._p_num[None, None, :groups], self._p_blocks[None, None, :groups],
                BLOCK_SIZE=(self.q_block, bs), mask_mod=same_sequence_causal,
                seq_lengths=(rows, self.kv.num_blocks * bs), compute_q_blocks=False,
            )  # fmt: skip
            self._prefill_masks[rows] = mask
        return mask

    # ---- per layer -------------------------------------------------------------------------------

    def attend(self, state: FlexState, layer, query, key, value, scaling) -> torch.Tensor:
        k_blocks, v_blocks = self.kv.layer_blocks(layer)
        nb, bs, kvh, d = k_blocks.shape
        k = k_blocks.view(1, nb * bs, kvh, d).transpose(1, 2)
        v = v_blocks.view(1, nb * bs, kvh, d).transpose(1, 2)
        fn = _compiled_flex() if self.compile else flex_attention
        parts = []
        db, pr = state.decode_rows, state.prefill_rows
        if db:
            q = query[0, :, :db].transpose(0, 1).unsqueeze(2)  # [db, H, 1, D]: a batch entry per sequence
            out = fn(q, k.expand(db, -1, -1, -1), v.expand(db, -1, -1, -1), block_mask=state.decode_mask,
                     scale=scaling, enable_gqa=True, kernel_options=self._decode_options)  # fmt: skip
            parts.append(out[:, :, 0])
        if pr:
            out = fn(
                query[:, :, db : db + pr], k, v, block_mask=state.prefill_mask, scale=scaling, enable_gqa=True
            )
            parts.append(out[0].transpose(0, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
