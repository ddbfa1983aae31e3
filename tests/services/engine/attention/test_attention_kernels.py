"""Every attention backend equals plain per-sequence SDPA on a packed step over a shuffled block pool.

The step mixes what the engine packs: one-token decode rows with contexts of different lengths, a
prefill chunk that continues earlier chunks, and a fresh prompt; the pool's blocks are handed out in a
shuffled order, so a backend that reads a wrong block, a wrong slot or another sequence's keys fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine.attention import StepLayout, create_backend
from services.engine.attention.flex import FlexBackend
from services.engine.decode_graphs import padding_only
from services.engine.kv_cache import KVCache, KVLayout

H, KVH, D, BS, NUM_BLOCKS = 8, 2, 16, 16, 48
# (tokens already in the pool before this step, tokens computed in this step): decodes first
SEQUENCES = [(36, 1), (4, 1), (120, 1), (15, 1), (64, 33), (0, 21)]


def packed_step(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv = KVCache(KVLayout(1, KVH, D, torch.float32), NUM_BLOCKS, BS)
    kv.pool.copy_(torch.randn(kv.pool.shape, generator=gen))
    order = torch.randperm(NUM_BLOCKS - 1, generator=gen).tolist()  # the last block is the scratch block
    tables, taken = [], 0
    for done, new in SEQUENCES:
        n = -(-(done + new) // BS)
        tables.append(order[taken : taken + n])
        taken += n
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    starts = [done for done, _ in SEQUENCES]
    lens = [new for _, new in SEQUENCES]
    chunk = torch.repeat_interleave(torch.arange(len(SEQUENCES)), torch.tensor(lens))
    pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens, strict=True)])
    t = len(chunk)
    query = torch.randn(1, H, t, D, generator=gen)
    # this step's keys and values, written where the engine writes them (by slot)
    slots = table[chunk, pos // BS] * BS + pos % BS
    key = kv.layer(0)[0][slots].permute(1, 0, 2).unsqueeze(0)
    value = kv.layer(0)[1][slots].permute(1, 0, 2).unsqueeze(0)
    num_decodes = sum(1 for _, n in SEQUENCES if n == 1)
    return kv, table, starts, lens, chunk, pos, query, key, value, num_decodes


def reference(kv, table, starts, lens, query) -> torch.Tensor:
    k_flat, v_flat = kv.layer(0)
    outs, q0 = [], 0
    for i, (s, n) in enumerate(zip(starts, lens, strict=True)):
        ctx = s + n
        slots = table[i, torch.arange(ctx) // BS] * BS + torch.arange(ctx) % BS
        k = k_flat[slots].permute(1, 0, 2).unsqueeze(0)
        v = v_flat[slots].permute(1, 0, 2).unsqueeze(0)
        mask = torch.arange(ctx)[None, :] <= torch.arange(s, ctx)[:, None]
        q = query[:, :, q0 : q0 + n]
        outs.append(
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
        )
        q0 += n
    return torch.cat(outs)


def layout_for(backend, table, starts, lens, chunk, pos, num_decodes):
    """The step's layout as the runner builds it, and the padded row of every real token."""
    n = len(chunk)
    decode_rows, prefill_rows = backend.padded_rows(num_decodes, n - num_decodes)
    padded = decode_rows + prefill_rows
    row = torch.arange(n)
    row[num_decodes:] += decode_rows - num_decodes
    token_chunk = torch.full((padded,), -1)
    token_chunk[row] = chunk
    token_pos = torch.zeros(padded, dtype=torch.long)
    token_pos[row] = pos
    layout = StepLayout(
        num_tokens=n, padded_tokens=padded, num_decodes=num_decodes, decode_rows=decode_rows,
        chunk_starts=starts, chunk_lens=lens, block_table=table, token_chunk=token_chunk, token_pos=token_pos,
    )  # fmt: skip
    return layout, row


def padded(x: torch.Tensor, row: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` [1, heads, n, D] spread over `rows` padded rows, garbage in the padding (it must not matter)."""
    out = torch.randn(1, x.shape[1], rows, x.shape[3])
    out[:, :, row] = x
    return out


@pytest.mark.parametrize(
    "name, compile, q_block",
    [
        ("sdpa", False, None), ("cpu", False, None),
        ("flex", False, 16), ("flex", False, 64), ("flex", True, 16), ("flex", True, 64),
    ],
)  # fmt: skip
def test_backend_matches_per_sequence_sdpa(name, compile, q_block):
    """cpu's decode kernel; flex with the CPU tile (16 rows) and the CUDA tile (64 rows, several
    prompts in one tile)."""
    kv, table, starts, lens, chunk, pos, query, key, value, num_decodes = packed_step()
    backend = create_backend(name, kv, max_num_tokens=64, max_num_seqs=8, max_model_len=256, compile=compile)
    if q_block is not None:
        backend = FlexBackend(kv, 64, 8, 256, compile=compile, q_block=q_block)
    layout, row = layout_for(backend, table, starts, lens, chunk, pos, num_decodes)
    t = layout.padded_tokens
    out = backend.attend(
        backend.prepare(layout), 0, padded(query, row, t), padded(key, row, t), padded(value, row, t), None
    )
    expected = reference(kv, table, starts, lens, query)
    assert out.shape[0] == t
    diff = (out[row] - expected).abs().max().item()
    assert diff < 1e-5, f"{name}: max difference {diff:.2e} from per-sequence SDPA"


def test_flex_state_is_rewritten_in_place_between_steps():
    """A second step reuses the first step's buffers and block mask object (what a captured graph
    relies on) and still gives the right answer."""
    kv, table, starts, lens, chunk, pos, query, key, value, num_decodes = packed_step(seed=1)
    backend = create_backend("flex", kv, max_num_tokens=64, max_num_seqs=8, max_model_len=256, compile=True)
    first_layout, _ = layout_for(backend, table, starts, lens, chunk, pos, num_decodes)
    first = backend.prepare(first_layout)
    # the same step again, with the sequences' blocks reversed: every table entry changes
    flipped = table.flip(0)
    flipped_starts, flipped_lens = starts[::-1], lens[::-1]
    flipped_chunk = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(flipped_lens))
    flipped_pos = torch.cat(
        [torch.arange(s, s + n) for s, n in zip(flipped_starts, flipped_lens, strict=True)]
    )
    q = torch.randn_like(query)
    # in the flipped order decodes are not first: every sequence goes through the prefill part
    second_layout, row = layout_for(
        backend, flipped, flipped_starts, flipped_lens, flipped_chunk, flipped_pos, 0
    )
    second = backend.prepare(second_layout)
    assert second.prefill_mask is first.prefill_mask, "the block mask is rewritten in place, not rebuilt"
    t = second_layout.padded_tokens
    out = backend.attend(second, 0, padded(q, row, t), padded(key, row, t), padded(value, row, t), None)
    expected = reference(kv, flipped, flipped_starts, flipped_lens, q)
    assert (out[row] - expected).abs().max().item() < 1e-5


def test_a_step_of_padding_only_sees_the_scratch_slot_only():
    """What a decode CUDA graph is captured with: every row is padding, sees only the scratch block's
    first slot (never nothing: a fully masked row is where kernels disagree) and no sequence's keys."""
    kv = packed_step()[0]
    backend = create_backend("flex", kv, max_num_tokens=64, max_num_seqs=8, max_model_len=256, compile=False)
    state = backend.prepare(padding_only(16))
    q, k = torch.randn(1, H, 16, D), torch.randn(1, KVH, 16, D)
    out = backend.attend(state, 0, q, k, k, None)
    scratch_value = kv.layer(0)[1][kv.scratch_slot - BS + 1]  # [KVH, D], first slot of the last block
    expected = scratch_value.repeat_interleave(H // KVH, dim=0).expand(16, H, D)
    assert torch.allclose(out, expected, atol=1e-6)


def test_unknown_backend_is_refused_with_the_choices():
    kv = KVCache(KVLayout(1, KVH, D, torch.float32), 4, BS)
    with pytest.raises(ValueError, match="sdpa"):
        create_backend("flash", kv, max_num_tokens=16, max_num_seqs=4, max_model_len=64)
