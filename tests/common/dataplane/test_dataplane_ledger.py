"""The consumer's bookkeeping and the transfer handle, without sockets or processes."""

from __future__ import annotations

import threading
import time

import pytest

from common.dataplane import Region, TransferHandle, TransferState
from common.dataplane.ledger import IntervalSet, Ledger


def test_interval_set_merges_overlapping_and_touching_intervals():
    s = IntervalSet()
    for start, end in [(10, 20), (30, 40), (20, 25), (0, 5), (24, 31), (100, 100)]:
        s.add(start, end)
    assert len(s) == 2
    assert s.covers(10, 40) and s.covers(0, 5) and s.covers(7, 7)
    assert not s.covers(4, 11) and not s.covers(39, 41)


def test_handle_wait_times_out_without_a_final_state():
    handle = TransferHandle("t")
    began = time.monotonic()
    assert handle.wait(0.05) is TransferState.PENDING
    assert time.monotonic() - began >= 0.04


def test_handle_wait_wakes_when_another_thread_finishes_it():
    handle = TransferHandle("t")
    threading.Timer(0.02, lambda: (handle.add_bytes(10), handle.succeed())).start()
    assert handle.wait(5) is TransferState.SUCCESS
    assert handle.bytes == 10 and handle.seconds >= 0


def test_abort_is_final_idempotent_and_calls_back_once():
    calls = []
    handle = TransferHandle("t", on_abort=calls.append)
    handle.abort()
    handle.abort()
    assert handle.poll() is TransferState.FAILED and handle.failure() == "aborted"
    assert calls == [handle]
    assert not handle.succeed(), "a failed transfer cannot succeed later"


def test_abort_after_success_changes_nothing():
    handle = TransferHandle("t")
    handle.succeed()
    handle.abort()
    assert handle.poll() is TransferState.SUCCESS and handle.failure() is None


def test_transfer_completes_when_chunks_cover_every_region():
    ledger = Ledger()
    handle = ledger.expect("t", [Region("a", 0, 100), Region("b", 50, 10), Region("a", 500, 0)])
    assert ledger.deliver("t", "a", 0, 60)
    assert ledger.deliver("t", "b", 50, 60)
    assert handle.poll() is TransferState.TRANSFERRING
    assert ledger.deliver("t", "a", 60, 100)
    assert handle.poll() is TransferState.SUCCESS and handle.bytes == 110


def test_early_bytes_are_seen_by_a_later_expect():
    ledger = Ledger()
    ledger.deliver("t", "a", 0, 8)
    assert ledger.expect("t", [Region("a", 0, 8)]).poll() is TransferState.SUCCESS


def test_bytes_for_aborted_or_finished_transfers_are_refused():
    ledger = Ledger()
    copies = []
    ledger.expect("t", [Region("a", 0, 8)]).abort()
    assert not ledger.deliver("t", "a", 0, 8, lambda: copies.append(1))
    ledger.expect("u", [Region("a", 0, 8)])
    assert ledger.deliver("u", "a", 0, 8)
    assert not ledger.deliver("u", "a", 0, 8, lambda: copies.append(1))
    assert copies == [] and not ledger.admits("t") and not ledger.admits("u")


def test_transfer_ids_are_single_use():
    ledger = Ledger()
    ledger.expect("t", [Region("a", 0, 1)])
    with pytest.raises(ValueError, match="already expected"):
        ledger.expect("t", [Region("a", 0, 1)])
    ledger.deliver("t", "a", 0, 1)
    with pytest.raises(ValueError, match="already completed"):
        ledger.expect("t", [Region("a", 0, 1)])


def test_a_transfer_failed_before_expect_is_failed_at_expect():
    ledger = Ledger()
    ledger.fail("t", "producer: gone")
    handle = ledger.expect("t", [Region("a", 0, 1)])
    assert handle.poll() is TransferState.FAILED and handle.failure() == "producer: gone"


def test_remembered_transfers_are_bounded_by_count_and_age():
    ledger = Ledger(ttl=0.05, max_remembered=3)
    for i in range(5):
        ledger.deliver(f"early-{i}", "a", 0, 1)
    assert len(ledger) == 3 and ledger.state("early-0") is None
    active = ledger.expect("kept", [Region("a", 0, 2)])
    time.sleep(0.06)
    ledger.deliver("fresh", "a", 0, 1)
    assert len(ledger) == 2, "old early entries expire; expected transfers stay"
    assert active.poll() is TransferState.PENDING


def test_many_regions_written_one_by_one_stay_cheap():
    ledger = Ledger()
    regions = [Region("kv", i * 64, 64) for i in range(20_000)]
    handle = ledger.expect("t", regions[::-1])
    began = time.monotonic()
    for i, region in enumerate(regions):
        ledger.deliver("t", "kv", region.offset, region.end)
        if i == len(regions) - 2:
            assert handle.poll() is TransferState.TRANSFERRING
    assert handle.poll() is TransferState.SUCCESS
    assert time.monotonic() - began < 2.0, "completion tracking must not be quadratic in regions"


def test_overlapping_and_split_regions_complete_only_when_covered():
    ledger = Ledger()
    handle = ledger.expect("t", [Region("a", 0, 1000), Region("a", 10, 5), Region("a", 990, 20)])
    ledger.deliver("t", "a", 0, 500)
    ledger.deliver("t", "a", 500, 1000)
    assert handle.poll() is TransferState.TRANSFERRING, "[990, 1010) is not covered yet"
    ledger.deliver("t", "a", 1000, 1010)
    assert handle.poll() is TransferState.SUCCESS
