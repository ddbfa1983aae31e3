"""The stages' phase histograms: values land in Prometheus' `le` buckets, the cumulative form is taken
once, sums and counts add up, and a Load carries them through msgpack and back."""

from __future__ import annotations

import math
import threading

import msgspec
import pytest

from common.protocol import Heartbeat, Load
from common.stage_histograms import (
    BUCKETS,
    NUM_COUNTS,
    PHASES,
    CacheCounts,
    PhaseHistograms,
    PhaseSnapshot,
    cumulative,
    merged,
)
from common.wire import decode_frames, encode_frames


def test_the_buckets_rise_from_half_a_millisecond_to_a_minute() -> None:
    assert BUCKETS[0] == 0.0005 and BUCKETS[-1] == 60.0
    assert list(BUCKETS) == sorted(set(BUCKETS))
    assert len(BUCKETS) + 1 == NUM_COUNTS


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, 0),
        (0.0005, 0),  # on a bound: in that bucket (le is "less than or equal")
        (0.00051, 1),
        (0.003, 3),
        (1.0, BUCKETS.index(1.0)),
        (60.0, len(BUCKETS) - 1),
        (61.0, len(BUCKETS)),  # past the last bound: the +Inf bucket
        (-0.2, 0),  # a step of the clock counts as 0
    ],
)
def test_a_value_lands_in_the_first_bucket_whose_bound_holds_it(seconds: float, bucket: int) -> None:
    h = PhaseHistograms()
    h.observe("encode", seconds)
    counts = h.snapshot()["encode"].counts
    assert len(counts) == NUM_COUNTS
    assert counts[bucket] == 1 and sum(counts) == 1


def test_sum_and_count_and_the_cumulative_form() -> None:
    h = PhaseHistograms()
    for s in (0.0004, 0.002, 0.002, 3.0, 100.0):
        h.observe("prefill", s)
    snap = h.snapshot()["prefill"]
    assert snap.count == 5 == h.count("prefill")
    assert snap.sum == pytest.approx(0.0004 + 0.002 + 0.002 + 3.0 + 100.0)
    le = cumulative(snap.counts)
    assert le[-1] == 5  # +Inf: everything
    assert le[0] == 1  # <= 0.5 ms
    assert le[BUCKETS.index(0.0025)] == 3
    assert le[BUCKETS.index(5.0)] == 4
    assert le[BUCKETS.index(60.0)] == 4
    assert le == sorted(le)
    assert cumulative([1, 0, 2, 3]) == [1, 1, 3, 6]


def test_only_observed_phases_are_in_the_snapshot_and_it_is_a_copy() -> None:
    h = PhaseHistograms()
    assert h.snapshot() == {}
    h.observe("decode_step", 0.01)
    snap = h.snapshot()
    assert set(snap) == {"decode_step"}
    h.observe("decode_step", 0.01)
    assert snap["decode_step"].count == 1 and h.count("decode_step") == 2


def test_an_unknown_phase_is_a_bug_not_a_new_series() -> None:
    with pytest.raises(ValueError, match="unknown phase"):
        PhaseHistograms().observe("prefil", 0.1)


def test_infinity_goes_to_the_last_bucket_and_not_into_the_sum() -> None:
    h = PhaseHistograms()
    h.observe("encode", math.inf)
    h.observe("encode", math.nan)  # counts as 0
    snap = h.snapshot()["encode"]
    assert snap.counts[-1] == 1 and snap.counts[0] == 1 and snap.sum == 0.0


def test_snapshots_while_another_thread_observes_stay_consistent() -> None:
    h = PhaseHistograms()
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            h.observe("decode_step", 0.001)

    t = threading.Thread(target=observe)
    t.start()
    try:
        for _ in range(200):
            snap = h.snapshot().get("decode_step")
            if snap is not None:
                assert snap.sum == pytest.approx(snap.count * 0.001)
    finally:
        stop.set()
        t.join()


def test_merged_adds_the_workers_phase_by_phase() -> None:
    a, b = PhaseHistograms(), PhaseHistograms()
    a.observe("encode", 0.01)
    b.observe("encode", 0.02)
    b.observe("prefill", 0.5)
    out = merged(a.snapshot(), b.snapshot())
    assert out["encode"].count == 2 and out["encode"].sum == pytest.approx(0.03)
    assert out["prefill"].count == 1
    assert a.snapshot()["encode"].count == 1, "the inputs are left alone"
    assert merged() == {}


def test_cache_counts_by_modality() -> None:
    c = CacheCounts()
    c.record("image", hit=False)
    c.record("image", hit=True)
    c.record("image", hit=True)
    c.record("video", hit=False)
    assert c.hits == {"image": 2} and c.misses == {"image": 1, "video": 1}


def test_a_load_with_phases_round_trips_through_the_wire() -> None:
    h = PhaseHistograms()
    for phase in PHASES:
        h.observe(phase, 0.003)
    load = Load(waiting=1, phases=h.snapshot(), cache_hits={"image": 2}, cache_misses={"image": 3})
    msg, _ = decode_frames(encode_frames(Heartbeat(sender="e0", load=load)))
    assert isinstance(msg, Heartbeat)
    assert msg.load == load
    assert isinstance(msg.load.phases["encode"], PhaseSnapshot)


def test_an_old_load_without_figures_still_decodes_and_empty_figures_are_not_sent() -> None:
    body = msgspec.msgpack.encode(Load(waiting=2))
    assert b"phases" not in body and b"cache_hits" not in body
    old = msgspec.msgpack.encode({"waiting": 2, "running": 1})
    assert msgspec.msgpack.decode(old, type=Load) == Load(waiting=2, running=1)
