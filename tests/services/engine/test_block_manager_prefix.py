"""Prefix caching in the block manager and the scheduler, on plain ints."""

from __future__ import annotations

from common.sampling_params import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.preemption import KVSwapper
from services.engine.prefix_hash import block_keys, mm_starts
from services.engine.scheduler import Scheduler
from services.engine.sequence import FinishReason, Sequence

BS = 4


def seq(rid: str, tokens: list[int], mm: list[tuple[int, str]] = ()) -> Sequence:
    s = Sequence(rid, tokens, SamplingParams(max_tokens=4))
    s.mm_starts = list(mm)
    return s


def computed(bm: BlockManager, s: Sequence) -> None:
    """As if the whole prompt had been computed: blocks, then registration."""
    bm.grow(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_blocks(s)


def test_a_repeated_prompt_finds_its_full_blocks_but_always_computes_its_last_token():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq("a", list(range(12)))  # three full blocks
    computed(bm, a)
    assert bm.num_cached_blocks == 3
    again = seq("b", list(range(12)))
    hits = bm.cached_prefix(again)
    assert hits == a.block_table[:2]  # the third holds the last token, which must be computed
    longer = seq("c", list(range(12)) + [99, 98])
    assert bm.cached_prefix(longer) == a.block_table[:3]
    other = seq("d", [0, 1, 2, 3, 7, 7, 7, 7, 8])
    assert bm.cached_prefix(other) == a.block_table[:1]  # the chain stops at the first difference


def test_placeholders_of_another_image_are_another_prefix():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    tokens = [1, 2, 9, 9, 9, 9, 9, 9, 3, 4]  # an image's six placeholders start at index 2
    a = seq("a", tokens, [(2, "image-x")])
    computed(bm, a)
    assert bm.cached_prefix(seq("b", tokens, [(2, "image-y")])) == []
    assert bm.cached_prefix(seq("c", tokens, [(2, "image-x")])) == a.block_table[:2]


def test_freed_blocks_keep_their_kv_until_handed_out_uncached_ones_first():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = seq("a", list(range(8)))
    computed(bm, a)
    scratch = seq("s", [5])
    bm.grow(scratch, 1)  # a block with no key
    cached = list(a.block_table)
    bm.free(a)
    bm.free(scratch)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b = seq("b", [50])
    bm.grow(b, 4)
    assert b.block_table[0] not in cached and bm.num_cached_blocks == 2  # the uncached ones go first
    again = seq("again", list(range(8)) + [1])
    assert bm.cached_prefix(again) == cached
    c = seq("c", [60] * 12)
    bm.grow(c, 12)  # takes everything left: the cached blocks are overwritten, their keys dropped
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(seq("x", list(range(8)) + [1])) == []


def test_shared_blocks_are_counted_once_and_freed_by_their_last_holder():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = seq("a", list(range(9)))
    computed(bm, a)
    b = seq("b", list(range(9)))
    bm.attach(b, bm.cached_prefix(b))
    bm.grow(b, 9)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.num_free_blocks == 8 - 4
    bm.free(a)
    assert bm.num_free_blocks == 8 - 3  # b still holds the shared two
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_without_prefix_caching_nothing_is_found():
    bm = BlockManager(8, BS)
    a = seq("a", list(range(9)))
    computed(bm, a)
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(seq("b", list(range(9)))) == []


def test_keys_chain_and_extend():
    tokens = list(range(10))
    two = block_keys(tokens, BS, [], [], 2)
    assert block_keys(tokens, BS, [], two[:1], 2) == two  # extending gives the same keys
    assert block_keys([9] + tokens[1:], BS, [], [], 2)[1] != two[1]  # a change early changes later keys
    assert mm_starts([2, 3, 4, 7, 8], [("x", 3), ("y", 2)]) == [(2, "x"), (7, "y")]


class _NoSwap(KVSwapper):
    def swap_out(self, seq):  # pragma: no cover - not reached
        raise AssertionError

    def swap_in(self, seq):  # pragma: no cover - not reached
        raise AssertionError


def scheduler(bm: BlockManager) -> Scheduler:
    return Scheduler(bm, _NoSwap(), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                     eos_token_ids=[])  # fmt: skip


def test_the_scheduler_starts_a_prompt_after_its_cached_prefix_and_counts_it():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    sched = scheduler(bm)
    first = seq("a", list(range(10)))
    sched.add(first)
    out = sched.schedule()
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 10)]
    sched.postprocess(out, [42])
    second = seq("b", list(range(10)))
    sched.add(second)
    out = sched.schedule()
    chunk = next(c for c in out.chunks if c.seq is second)
    assert (chunk.start, chunk.num_tokens) == (8, 2) and second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert (bm.query_tokens, bm.hit_tokens) == (20, 8)


def test_a_prompt_that_does_not_fit_waits_holding_nothing():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    sched = scheduler(bm)
    a = seq("a", list(range(9)))
    sched.add(a)
    sched.postprocess(sched.schedule(), [42])  # a holds 3 blocks, 2 of them cached
    b = seq("b", list(range(8)) + [77] * 8)  # shares 2 blocks, needs 3 more: only 1 is free
    sched.add(b)
    sched.schedule()
    assert b.block_table == [] and b.num_computed_tokens == 0 and b in sched.waiting
    sched.finish(a, FinishReason.STOP)
    assert bm.num_free_blocks == 4
