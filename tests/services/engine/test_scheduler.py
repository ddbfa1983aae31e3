"""The scheduler and block manager on plain ints: batching, budgets, swapping, freeing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.sampling_params import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.scheduler import Scheduler
from services.engine.sequence import FinishReason, Sequence, SequenceStatus

EOS = 0


class RecordingSwapper:
    def __init__(self):
        self.out, self.back = [], []

    def swap_out(self, seq):
        seq.swapped_kv = ("kv", seq.num_computed_tokens)
        self.out.append(seq.request_id)

    def swap_in(self, seq):
        assert seq.swapped_kv == ("kv", seq.num_computed_tokens)
        seq.swapped_kv = None
        self.back.append(seq.request_id)


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_len=256):
    bm = BlockManager(num_blocks, block_size)
    swapper = RecordingSwapper()
    sched = Scheduler(
        bm,
        swapper,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_len,
        eos_token_ids=[EOS],
    )
    return sched, bm, swapper


def seq(rid, prompt_len, max_tokens=4, **kw):
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def run_step(sched, token=7):
    out = sched.schedule()
    sampled = [token for c in out.chunks if c.samples]
    return out, sched.postprocess(out, sampled)


def test_scheduler_and_block_manager_never_import_torch():
    code = (
        "import sys; import services.engine.scheduler, services.engine.block_manager; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_manager_grows_by_whole_blocks_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq("a", 5)
    assert bm.blocks_to_grow(s, 5) == 2
    bm.grow(s, 5)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    bm.grow(s, 8)  # still fits in two blocks
    assert len(s.block_table) == 2
    assert not bm.can_grow(s, 17)
    with pytest.raises(RuntimeError):
        bm.grow(s, 17)
    bm.free(s)
    bm.free(s)
    assert bm.num_free_blocks == 4


def test_prompt_is_chunked_by_the_token_budget():
    sched, *_ = make(budget=8)
    sched.add(seq("a", 20))
    sizes = []
    while True:
        out, updates = run_step(sched)
        sizes.append(out.chunks[0].num_tokens)
        if updates[0].new_token is not None:
            break
    assert sizes == [8, 8, 4]


def test_requests_join_and_leave_the_running_batch():
    sched, bm, _ = make()
    sched.add(seq("a", 6, max_tokens=2))
    run_step(sched)  # a: prefill + first token
    sched.add(seq("b", 6, max_tokens=3))
    out, _ = run_step(sched)
    # decodes come first in a step, then prefill chunks
    assert [(c.seq.request_id, c.is_decode) for c in out.chunks] == [("a", True), ("b", False)]
    out, updates = run_step(sched)
    assert {c.seq.request_id for c in out.chunks} == {"b"}  # a finished after 2 tokens
    run_step(sched)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks


def test_max_num_seqs_caps_the_batch():
    sched, *_ = make(max_seqs=2)
    for i in range(3):
        sched.add(seq(f"r{i}", 4))
    out = sched.schedule()
    assert len(out.chunks) == 2 and len(sched.waiting) == 1


def test_out_of_blocks_swaps_the_newest_out_and_back_in_without_losing_tokens():
    sched, bm, swapper = make(num_blocks=6, block_size=4, max_len=24)
    sched.add(seq("old", 8, max_tokens=12, ignore_eos=True))
    sched.add(seq("new", 8, max_tokens=12, ignore_eos=True))
    steps = 0
    while sched.has_unfinished():
        run_step(sched)
        steps += 1
        assert steps < 100
    assert swapper.out and swapper.out == swapper.back  # swapped out, and every one came back
    assert sched.num_swap_outs >= 1
    assert bm.num_free_blocks == bm.num_blocks


def test_stop_rules_eos_stop_token_and_max_tokens():
    sched, *_ = make()
    sched.add(seq("eos", 4, max_tokens=10))
    sched.add(seq("stop_token", 4, max_tokens=10, stop_token_ids=[9]))
    sched.add(seq("length", 4, max_tokens=1))
    out = sched.schedule()
    ups = sched.postprocess(out, [EOS, 9, 5])
    reasons = {u.seq.request_id: u.seq.finish_reason for u in ups}
    assert reasons == {
        "eos": FinishReason.STOP,
        "stop_token": FinishReason.STOP,
        "length": FinishReason.LENGTH,
    }


def test_ignore_eos_keeps_going():
    sched, *_ = make()
    s = seq("a", 4, max_tokens=3, ignore_eos=True)
    sched.add(s)
    for _ in range(3):
        run_step(sched, token=EOS)
    assert s.output_token_ids == [EOS, EOS, EOS] and s.finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_wherever_the_request_is():
    sched, bm, _ = make(max_seqs=1)
    sched.add(seq("running", 10))
    sched.add(seq("waiting", 10))
    run_step(sched)
    assert bm.num_free_blocks < bm.num_blocks
    assert sched.abort("running") and sched.abort("waiting")
    assert not sched.abort("unknown")
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished()


def test_prompt_over_the_context_is_refused_cleanly():
    sched, *_ = make(max_len=16)
    with pytest.raises(ValueError, match="context of 16 tokens"):
        sched.add(seq("long", 16))
    with pytest.raises(ValueError, match="already in the engine"):
        sched.add(seq("dup", 4))
        sched.add(seq("dup", 4))


def test_prefill_only_sequences_stop_after_their_first_token_and_keep_their_blocks():
    sched, bm, _ = make()
    s = Sequence("p", [1, 2, 3, 4, 5], SamplingParams(max_tokens=8), prefill_only=True)
    sched.add(s)
    run_step(sched)
    assert s.status is SequenceStatus.PREFILLED and s.block_table
    assert not sched.has_unfinished()
    sched.release(s)
    assert bm.num_free_blocks == bm.num_blocks


def test_a_reserved_sequence_joins_with_its_kv_in_place_without_a_swap():
    sched, bm, swapper = make()
    s = seq("d", 6, max_tokens=3)
    assert sched.reserve(s)
    assert s.status is SequenceStatus.REMOTE and len(s.block_table) == 2
    assert not sched.has_unfinished(), "a reservation waits on the data plane, not on a step"
    assert not sched.schedule()
    arrived = sched.arrive("d", [*range(1, 7), 11], model_inputs="inputs")  # prompt + first token
    assert arrived is s and s.model_inputs == "inputs" and s.num_computed_tokens == 6
    out, _ = run_step(sched)
    assert swapper.back == [], "the KV is already in its blocks: nothing to copy in"
    assert out.chunks[0].is_decode and out.chunks[0].start == 6 and s.status is SequenceStatus.RUNNING
    while sched.has_unfinished():
        run_step(sched)
    assert s.output_token_ids == [11, 7, 7] and bm.num_free_blocks == bm.num_blocks


def test_abort_frees_a_reservation_before_and_after_its_kv_arrives():
    sched, bm, _ = make()
    sched.reserve(seq("waiting_for_kv", 10))
    sched.reserve(seq("kv_in", 10))
    sched.arrive("kv_in", list(range(11)))
    assert bm.num_free_blocks == bm.num_blocks - 6
    assert sched.abort("waiting_for_kv") and sched.abort("kv_in")
    assert bm.num_free_blocks == bm.num_blocks and not sched.reserved and not sched.arrived


def test_reserve_without_room_holds_nothing_and_checks_like_add():
    sched, bm, _ = make(num_blocks=4, block_size=4, max_len=16)
    assert sched.reserve(seq("a", 8))
    assert not sched.reserve(seq("b", 9)), "3 blocks needed, 2 free"
    assert "b" not in sched.requests and bm.num_free_blocks == 2
    with pytest.raises(ValueError, match="already in the engine"):
        sched.reserve(seq("a", 4))
    with pytest.raises(ValueError, match="context of 16 tokens"):
        sched.reserve(seq("long", 16))


def test_arrive_refuses_what_it_cannot_decode_and_keeps_the_reservation():
    sched, bm, _ = make(max_len=16)
    with pytest.raises(ValueError, match="no reservation"):
        sched.arrive("unknown", [1, 2])
    sched.reserve(seq("d", 6))
    with pytest.raises(ValueError, match="at least one sampled token"):
        sched.arrive("d", list(range(6)))
    assert "d" in sched.reserved  # still held: the worker's abort frees it
    assert sched.abort("d") and bm.num_free_blocks == bm.num_blocks


def test_watermark_guards_running_sequences_but_never_a_lone_one():
    bm = BlockManager(100, 4)
    sched = Scheduler(
        bm, RecordingSwapper(), max_num_seqs=8, max_num_batched_tokens=512, max_model_len=400,
        eos_token_ids=[EOS], watermark_blocks=5,
    )  # fmt: skip
    assert sched.reserve(seq("whole_pool", 399)), "alone, a sequence may take every block"
    sched.abort("whole_pool")
    assert sched.reserve(seq("a", 40))  # 10 blocks, 90 free
    assert not sched.reserve(seq("b", 4 * 86)), "86 blocks would leave fewer than the watermark"
    assert sched.reserve(seq("c", 4 * 85))
    sched.add(seq("w", 1))
    assert not sched.schedule(), "a new prompt waits while the pool is at the watermark"
