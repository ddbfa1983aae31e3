"""The CPU paged-decode kernel against SDPA over the same keys gathered, and its refusals.

Block tables are shuffled over the pool, contexts cross block boundaries (1 token, a block exactly,
one past it, long ones), query heads share KV heads in groups of 1 to 8, and the query rows are a
strided view as the engine hands them over; float32 must agree to 1e-5, bfloat16 to its precision.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.attention import cpu_kernel

kernel = cpu_kernel.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C compiler to build the CPU kernel")


def gathered_sdpa(q, k_pool, v_pool, table, contexts):
    """Per row: its context's keys by token, plain SDPA with the query heads grouped over KV heads."""
    bs, kvh = k_pool.shape[1], k_pool.shape[2]
    outs = []
    for r in range(q.shape[0]):
        n = int(contexts[r])
        tok = torch.arange(n)
        slots = table[r, tok // bs].long() * bs + tok % bs
        k = k_pool.reshape(-1, kvh, k_pool.shape[3])[slots].float().transpose(0, 1)  # [KVH, n, D]
        v = v_pool.reshape(-1, kvh, v_pool.shape[3])[slots].float().transpose(0, 1)
        qr = q[r].float().unsqueeze(1)  # [H, 1, D]
        outs.append(F.scaled_dot_product_attention(qr, k, v, enable_gqa=True).squeeze(1))
    return torch.stack(outs)


def run_case(seed, rows, heads, kv_heads, head_dim, block_size, dtype, contexts, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in contexts) + 3
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    width = max(-(-c // block_size) for c in contexts)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(rows, width, dtype=torch.int32)
    taken = 0
    for r, c in enumerate(contexts):
        n = -(-c // block_size)
        table[r, :n] = order[taken : taken + n].to(torch.int32)
        taken += n
    # the engine's query rows are a view of [1, H, T, D]: rows strided by D, heads by T * D
    step = (q_scale * torch.randn(1, heads, rows + 2, head_dim, generator=gen)).to(dtype)
    q = step[0, :, :rows].transpose(0, 1)
    ctx = torch.tensor(contexts, dtype=torch.int32)
    out = torch.full((rows, heads, head_dim), float("nan"), dtype=dtype)
    kernel(q, k_pool, v_pool, table, ctx, head_dim**-0.5, out)
    return out.float(), gathered_sdpa(q, k_pool, v_pool, table, ctx)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (12, 2), (16, 2)])
@pytest.mark.parametrize("head_dim, block_size", [(64, 16), (128, 16), (16, 32), (80, 8)])
def test_kernel_equals_gathered_sdpa(dtype, tol, heads, kv_heads, head_dim, block_size):
    contexts = [1, block_size, block_size + 1, 3 * block_size - 1, 257]
    got, expected = run_case(0, len(contexts), heads, kv_heads, head_dim, block_size, dtype, contexts)
    diff = (got - expected).abs().max().item()
    assert diff < tol, f"max difference {diff:.2e} from gathered SDPA"


@settings(max_examples=25, deadline=None)
@given(
    contexts=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    block_size=st.sampled_from([1, 4, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_gathered_sdpa_on_any_contexts(contexts, block_size, seed):
    got, expected = run_case(seed, len(contexts), 8, 2, 32, block_size, torch.float32, contexts)
    assert (got - expected).abs().max().item() < 1e-5


def test_large_scores_do_not_overflow():
    """Scores in the hundreds, whose exp overflows a float (the online softmax subtracts the running
    max first), and weights that underflow to exactly 0 beside them."""
    got, expected = run_case(1, 3, 4, 2, 64, 16, torch.float32, [40, 3, 100], q_scale=60.0)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() < 1e-4


def test_refuses_what_it_cannot_read():
    k = torch.zeros(4, 16, 2, 64)
    table, ctx = torch.zeros(1, 1, dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    q, out = torch.zeros(1, 8, 64), torch.zeros(1, 8, 64)
    with pytest.raises(ValueError, match="layout, dtype or device"):
        kernel(q, k, k, table.long(), ctx, 0.125, out)  # int64 block table
    with pytest.raises(ValueError, match="layout, dtype or device"):
        kernel(q.double(), k, k, table, ctx, 0.125, out)
    with pytest.raises(ValueError, match="longer than its block-table row"):
        kernel(q, k, k, table, torch.tensor([17], dtype=torch.int32), 0.125, out)
    with pytest.raises(ValueError, match="at most 32 query heads per KV head"):
        kernel(torch.zeros(1, 66, 64), k, k, table, ctx, 0.125, torch.zeros(1, 66, 64))
    assert not kernel.fits_pool(torch.float16, 64, 16) and not kernel.fits_pool(torch.float32, 512, 16)
    assert not kernel.fits_pool(torch.float32, 72, 16), "head dims come in whole 16-lane vectors"


def test_runs_on_torchs_openmp_threads():
    """The library links libgomp by soname, so the process has one OpenMP runtime, torch's: its threads
    are torch's threads (no second pool oversubscribing the cores)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, f"more than one OpenMP runtime loaded: {sorted(gomp)}"


def test_cached_library_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EPD_SERVE_CACHE", str(tmp_path))
    compiler = cpu_kernel._compiler()
    first = cpu_kernel.build(compiler)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "kernels"
    assert [p.name for p in first.parent.iterdir()] == [first.name], "no temporary file may be left behind"
