"""Who is preempted, who goes first after, and what happens when the host swap space is full.

The scheduler tests drive the scheduler with a fake swapper and a fake model (`next_token`: a pure
function of the tokens so far, so recomputed KV is "the same" by construction and any token the
scheduler samples at the wrong place shows); the engine tests run the tiny model under a tiny pool
and a tiny swap cap against the same engine without pressure.
"""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.scheduler import Scheduler
from services.engine.sequence import FinishReason, SequenceStatus
from tests.services.engine.test_scheduler import EOS, RecordingSwapper, run_step, seq


def make(num_blocks, block_size=4, budget=32, max_seqs=8, max_len=64, swap_blocks=None):
    bm = BlockManager(num_blocks, block_size)
    swapper = RecordingSwapper()
    sched = Scheduler(
        bm, swapper, max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
        eos_token_ids=[EOS], num_swap_blocks=swap_blocks,
    )  # fmt: skip
    return sched, bm, swapper


def next_token(prefix):
    """The fake model: the token after `prefix` depends on every token of it."""
    return 1 + sum((i + 1) * t for i, t in enumerate(prefix)) % 89


def model_step(sched):
    out = sched.schedule()
    sampled = [next_token(c.seq.token_ids[: c.start + c.num_tokens]) for c in out.chunks if c.samples]
    sched.postprocess(out, sampled)
    return out


def step_until(sched, done, what, max_steps=200, step=model_step):
    """Step until `done()`; returns the last step's output."""
    for _ in range(max_steps):
        out = step(sched)
        if done():
            return out
    raise AssertionError(f"{what} did not happen in {max_steps} steps")


def run_all(sched, max_steps=500):
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        model_step(sched)
        cap = sched.num_swap_blocks
        assert cap is None or sched.num_swapped_blocks <= cap, "swapped KV went over the swap space"
    raise AssertionError(f"still unfinished after {max_steps} steps: {sched.requests}")


def long(rid, prompt_len=8, max_tokens=12):
    return seq(rid, prompt_len, max_tokens=max_tokens, ignore_eos=True)


# ---- 1. the victim is the newest arrival -----------------------------------------------------------


def test_the_victim_is_the_newest_arrival_not_the_last_to_join_the_batch():
    # `arrival` is when a request reached the engine; the order it joined the batch can differ (a
    # swap-in, a remote arrival): here the older request joins last
    old, new = long("old"), long("new")
    sched, _, swapper = make(num_blocks=6)
    sched.add(new)
    sched.add(old)
    step_until(sched, lambda: swapper.out, "a swap-out", step=run_step)
    assert swapper.out == ["new"], f"swapped out {swapper.out}: the oldest request was preempted"
    assert [s.request_id for s in sched.running] == ["old"]


def test_no_request_is_preempted_while_a_newer_one_runs():
    sched, bm, swapper = make(num_blocks=8)
    victims = []

    def check_out(s):
        newer = [r.request_id for r in sched.running if r.arrival > s.arrival]
        victims.append((s.request_id, newer))
        RecordingSwapper.swap_out(swapper, s)

    swapper.swap_out = check_out
    for i in range(6):  # a stream of requests joining a full batch
        sched.add(long(f"r{i}", prompt_len=4 + i, max_tokens=14))
        for _ in range(3):
            model_step(sched)
    run_all(sched)
    assert victims, "the pool should have run out of blocks"
    assert all(not newer for _, newer in victims), f"victims and newer running requests: {victims}"
    assert bm.num_free_blocks == bm.num_blocks


# ---- 2. swapped sequences go first -----------------------------------------------------------------


def _swap_out_b(sched, swapper):
    """a and b decode until the pool is full; b, the newer, is swapped out with 3 blocks of KV and
    needs 4 to come back, while only 2 are free."""
    a, b = long("a"), long("b")
    sched.add(a)
    sched.add(b)
    step_until(sched, lambda: swapper.out, "a swap-out")
    assert swapper.out == ["b"] and b.status is SequenceStatus.SWAPPED
    return a, b


def test_a_new_prompt_waits_behind_a_swapped_sequence_even_when_it_fits():
    sched, bm, swapper = make(num_blocks=6)
    a, b = _swap_out_b(sched, swapper)
    c = seq("c", 3, max_tokens=2)  # one block: it fits in what is free, b does not yet
    sched.add(c)
    assert bm.num_free_blocks == 2
    step_until(sched, lambda: c.status is not SequenceStatus.WAITING, "c's admission")
    assert b.status is not SequenceStatus.SWAPPED, "a new prompt ran while a swapped sequence waited"
    assert swapper.back == ["b"]
    run_all(sched)
    assert bm.num_free_blocks == bm.num_blocks


def test_an_arrived_remote_sequence_and_a_reservation_wait_behind_a_swapped_sequence():
    sched, bm, swapper = make(num_blocks=7)
    r = seq("r", 3, max_tokens=2)
    assert sched.reserve(r)  # its KV arrives while a and b run
    a, b = _swap_out_b(sched, swapper)
    sched.arrive("r", [1, 2, 3, 5])
    assert not sched.reserve(seq("late", 3)), "a reservation took blocks a swapped sequence waits for"
    step_until(sched, lambda: r.status is not SequenceStatus.REMOTE, "r's admission")
    assert b.status is not SequenceStatus.SWAPPED, "an arrived sequence ran while b waited swapped out"
    run_all(sched)
    assert bm.num_free_blocks == bm.num_blocks


# ---- 3. a cap on host swap space -------------------------------------------------------------------


def test_past_the_swap_cap_the_victim_is_recomputed_and_gets_the_same_tokens():
    prompts = [("a", 8), ("b", 8), ("c", 8), ("d", 4)]
    roomy, *_ = make(num_blocks=64, max_seqs=3)
    for rid, n in prompts:
        roomy.add(long(rid, n, max_tokens=16))
    expected = {}
    while roomy.has_unfinished():
        for s in list(roomy.requests.values()):
            expected[s.request_id] = s
        model_step(roomy)

    sched, bm, swapper = make(num_blocks=9, max_seqs=3, swap_blocks=3)  # room for one victim's KV
    seqs = {rid: long(rid, n, max_tokens=16) for rid, n in prompts}
    for s in seqs.values():
        sched.add(s)
    a, b, c, d = seqs.values()
    step_until(sched, lambda: sched.num_recomputes, "a recompute")
    assert swapper.out == ["c"], "the newest running sequence goes to host memory first"
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert b.num_output_tokens > 0, "a recomputed sequence keeps the tokens it generated"
    assert list(sched.waiting) == [b, d], "a recomputed sequence waits at its place by arrival"
    assert sched.num_swapped_blocks == 3 and swapper.out == ["c"], "swapping b would pass the cap"

    before = b.num_tokens
    out = step_until(sched, lambda: b.num_computed_tokens, "b's recompute")
    (chunk,) = [ch for ch in out.chunks if ch.seq is b]
    assert (chunk.start, chunk.num_tokens) == (0, before) and not chunk.is_decode, "one prefill of all"
    assert b.num_tokens == before + 1, "the recompute samples the next token"
    run_all(sched)
    got = {s.request_id: s.output_token_ids for s in seqs.values()}
    assert got == {rid: s.output_token_ids for rid, s in expected.items()}
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs.values())
    assert bm.num_free_blocks == bm.num_blocks


def test_with_no_swap_space_preemption_only_recomputes():
    sched, bm, swapper = make(num_blocks=6, swap_blocks=0)
    for rid in ("a", "b", "c"):
        sched.add(long(rid, max_tokens=14))
    run_all(sched)
    assert swapper.out == [] and sched.num_recomputes > 0
    assert bm.num_free_blocks == bm.num_blocks


def test_a_remote_sequence_that_can_neither_swap_nor_recompute_fails_alone():
    sched, bm, _ = make(num_blocks=6, swap_blocks=0)
    first, second = long("first", max_tokens=12), long("second", max_tokens=12)
    for s in (first, second):
        assert sched.reserve(s)
        sched.arrive(s.request_id, [*range(1, 9), 5])  # prompt + the first token from the prefill
    failed = []
    step_until(
        sched,
        lambda: not sched.has_unfinished(),
        "the end",
        step=lambda s: failed.extend(model_step(s).failed),
    )
    assert failed == [second], "the newest arrival is the one given up"
    assert second.finish_reason is FinishReason.ERROR and second.request_id not in sched.requests
    assert first.finish_reason is FinishReason.LENGTH and first.num_output_tokens == 12
    assert bm.num_free_blocks == bm.num_blocks


def test_swap_space_is_checked_in_the_config():
    assert EngineConfig().swap_space_bytes == 4 << 30
    with pytest.raises(ValueError, match="swap_space_bytes"):
        EngineConfig(swap_space_bytes=-1)


# ---- the engine on the tiny model ------------------------------------------------------------------

TIGHT = dict(num_blocks=24, block_size=8, max_model_len=160)


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    from services.models.loader import load_model

    return load_model(tiny_qwen2_vl)


@pytest.fixture(scope="module")
def workload(loaded):
    """Ten concurrent requests (some with an image, one seeded) and their tokens without pressure."""
    from services.engine.llm import LLM
    from tests.reference import make_image

    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3)
    requests = [
        (
            f"Request number {i} " * (1 + i % 3),
            [make_image(84, 56, i)] * (i % 2),
            seeded if i == 4 else greedy,
        )
        for i in range(10)
    ]
    roomy = LLM(loaded, EngineConfig(num_blocks=512, max_model_len=2048))
    expected = [roomy.generate(text, images, params).token_ids for text, images, params in requests]
    return requests, expected


@pytest.mark.parametrize("swap_blocks", [0, 10])
def test_the_engine_under_a_tiny_pool_and_swap_cap_keeps_every_request_s_tokens(
    loaded, workload, swap_blocks
):
    from services.engine.llm import LLM

    requests, expected = workload
    probe = LLM(loaded, EngineConfig(**TIGHT))
    block_bytes = probe.engine.layout.token_bytes() * TIGHT["block_size"]
    tight = LLM(loaded, EngineConfig(**TIGHT, swap_space_bytes=swap_blocks * block_bytes))
    sched = tight.engine.scheduler
    assert sched.num_swap_blocks == swap_blocks
    ids = {
        tight.submit(tight.prepare(text, images), params): i
        for i, (text, images, params) in enumerate(requests)
    }
    done = []
    while tight.engine.has_unfinished():
        done += tight.step()
        assert sched.num_swapped_blocks <= swap_blocks, "swapped KV went over the swap space"
    assert sched.num_recomputes > 0, "the swap space should have run out"
    assert (sched.num_swap_outs > 0) == (swap_blocks > 0)
    assert {ids[c.request_id]: c.token_ids for c in done} == dict(enumerate(expected))
    assert all(c.finish_reason == "length" for c in done)
    assert tight.engine.block_manager.num_free_blocks == TIGHT["num_blocks"]


def test_a_decode_engine_without_swap_space_fails_a_request_instead_of_crashing(loaded):
    from services.engine.engine import Engine

    engine = Engine(loaded.family, loaded.eos_token_ids, EngineConfig(**TIGHT, swap_space_bytes=0))
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    for i in range(4):  # prompts "computed by a prefill": their KV is whatever the blocks hold
        assert engine.reserve(f"d{i}", 30, params) is not None
        engine.admit_reserved(f"d{i}", [*range(100, 130), 7])
    ends = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                ends[out.request_id] = out.finish_reason
    assert sorted(ends) == ["d0", "d1", "d2", "d3"]
    assert "error" in ends.values() and ends["d0"] == "length", ends
    assert engine.block_manager.num_free_blocks == TIGHT["num_blocks"]
