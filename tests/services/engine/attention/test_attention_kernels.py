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


def layout_for(backend, table, starts, lens, chunk, pos, num_decodes) -> StepLayout:
    n = len(chunk)
    padded = backend.padded_tokens(n)
    pad = padded - n
    return StepLayout(
        num_tokens=n, padded_tokens=padded, num_decodes=num_decodes, chunk_starts=starts,
        chunk_lens=lens, block_table=table,
        token_chunk=torch.cat([chunk, torch.full((pad,), -1)]), token_pos=torch.cat([pos, torch.zeros(pad, dtype=torch.long)]),
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, compile", [("sdpa", False), ("flex", False), pytest.param("flex", True, marks=pytest.mark.slow)]
)
def test_backend_matches_per_sequence_sdpa(name, compile):
    kv, table, starts, lens, chunk, pos, query, key, value, num_decodes = packed_step()
    backend = create_backend(name, kv, max_num_tokens=64, max_model_len=256, compile=compile)
    layout = layout_for(backend, table, starts, lens, chunk, pos, num_decodes)
    pad = layout.padded_tokens - layout.num_tokens
    if pad:  # padding rows carry garbage queries; they must not disturb the real rows
        query = torch.cat([query, torch.randn(1, H, pad, D)], dim=2)
        key = torch.cat([key, torch.randn(1, KVH, pad, D)], dim=2)
        value = torch.cat([value, torch.randn(1, KVH, pad, D)], dim=2)
    out = backend.attend(backend.prepare(layout), 0, query, key, value, None)
    expected = reference(kv, table, starts, lens, query)
    assert out.shape[0] == layout.padded_tokens
    diff = (out[: layout.num_tokens] - expected).abs().max().item()
    assert diff < 1e-5, f"{name}: max difference {diff:.2e} from per-sequence SDPA"


def test_flex_state_is_rewritten_in_place_between_steps():
    """A second step reuses the first step's buffers and block mask object (what a captured graph
    relies on) and still gives the right answer."""
    kv, table, starts, lens, chunk, pos, query, key, value, num_decodes = packed_step(seed=1)
    backend = create_backend("flex", kv, max_num_tokens=64, max_model_len=256, compile=False)
    first = backend.prepare(layout_for(backend, table, starts, lens, chunk, pos, num_decodes))
    # the same step again, with the sequences' blocks reversed: every table entry changes
    flipped = table.flip(0)
    flipped_starts, flipped_lens = starts[::-1], lens[::-1]
    flipped_chunk = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(flipped_lens))
    flipped_pos = torch.cat(
        [torch.arange(s, s + n) for s, n in zip(flipped_starts, flipped_lens, strict=True)]
    )
    q = torch.randn_like(query)
    second = backend.prepare(
        layout_for(backend, flipped, flipped_starts, flipped_lens, flipped_chunk, flipped_pos, 0)
    )
    assert second is first
    out = backend.attend(second, 0, q, key, value, None)
    expected = reference(kv, flipped, flipped_starts, flipped_lens, q)
    assert (out[: len(flipped_chunk)] - expected).abs().max().item() < 1e-5


def test_unknown_backend_is_refused_with_the_choices():
    kv = KVCache(KVLayout(1, KVH, D, torch.float32), 4, BS)
    with pytest.raises(ValueError, match="sdpa"):
        create_backend("flash", kv, max_num_tokens=16, max_model_len=64)
