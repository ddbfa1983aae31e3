"""What the nixl backend must get right beyond the shared contract: its writes are one-sided, so the
consumer's current state (not the descriptor a producer holds) decides where bytes may land."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq
from dataplane_harness import start_peers, wait_until
from dataplane_peer import pattern

from common.dataplane import Region, TransferState, create_dataplane
from common.dataplane.nixl import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]


def tid() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def peer():
    (started,) = start_peers("nixl", 1, {"chunk_bytes": 256 * 1024})
    yield started
    started.close()


@pytest.fixture
def consumer():
    with create_dataplane("nixl") as plane:
        yield plane


def test_an_old_descriptor_reaches_buffers_allocated_after_it(consumer, peer):
    stale = consumer.descriptor()  # services publish it once, at REGISTER
    buf = np.frombuffer(consumer.allocate("late", MiB), np.uint8)
    handle = consumer.expect(t := tid(), [Region("late", 0, MiB)])
    assert peer.call("write", peer=stale, tid=t, items=[["late", 0, MiB, 3]], wait=30)["state"] == "success"
    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    assert np.array_equal(buf, pattern(MiB, 3))


def test_a_buffer_freed_and_allocated_again_is_written_at_its_new_address(consumer, peer):
    desc = consumer.descriptor()
    old = np.frombuffer(consumer.allocate("b", MiB), np.uint8)  # kept alive here, as a pool view would be
    first = consumer.expect(t := tid(), [Region("b", 0, MiB)])
    peer.call("write", peer=desc, tid=t, items=[["b", 0, MiB, 1]], wait=30)
    assert first.wait(30) is TransferState.SUCCESS
    consumer.free("b")

    new = np.frombuffer(consumer.allocate("b", MiB), np.uint8)
    second = consumer.expect(t2 := tid(), [Region("b", 0, MiB)])
    peer.call("write", peer=desc, tid=t2, items=[["b", 0, MiB, 2]], wait=30)
    assert second.wait(30) is TransferState.SUCCESS, second.failure()
    assert np.array_equal(new, pattern(MiB, 2))
    assert np.array_equal(old, pattern(MiB, 1)), "the second write touched the freed buffer"


def test_a_consumer_abort_stops_a_long_write_within_a_few_batches(consumer, peer):
    size = 128 * MiB  # 512 batches of 256 KiB: the abort lands mid-way
    buf = np.frombuffer(consumer.allocate("big", size), np.uint8)
    handle = consumer.expect(t := tid(), [Region("big", 0, size)])
    peer.call("write", peer=consumer.descriptor(), tid=t, items=[["big", 0, size, 5]])
    wait_until(lambda: handle.bytes > 0, timeout=30, what="the first batch")
    handle.abort()

    reply = peer.call("wait", tid=t, timeout=30)
    assert reply["state"] == "failed" and "consumer" in reply["failure"], reply
    assert not buf[-size // 4 :].any(), "the write went on after the consumer aborted"


def test_sources_in_place_and_staged_arrive_in_one_write():
    options = {"chunk_bytes": MiB, "stage_bytes": 256 * 1024, "stage_below": 64 * 1024}
    with create_dataplane("nixl") as consumer, create_dataplane("nixl", **options) as producer:
        buf = np.frombuffer(consumer.allocate("mix", 16 * MiB), np.uint8)
        big = pattern(5 * MiB, 1)  # registered for the job, read in place, 5 batches
        frozen = pattern(300 * 1024, 2).tobytes()  # read-only: staged in slot-sized pieces
        small = [pattern(1024, 10 + i) for i in range(100)]  # staged, packed many per batch
        items = [(big, Region("mix", 0, big.nbytes)), (frozen, Region("mix", 6 * MiB, len(frozen)))]
        items += [(s, Region("mix", 8 * MiB + i * 4096, 1024)) for i, s in enumerate(small)]
        handle = consumer.expect(t := tid(), [r for _, r in items])
        mine = producer.write(consumer.descriptor(), t, items)
        assert mine.wait(30) is TransferState.SUCCESS, mine.failure()
        assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
        for source, region in items:
            assert bytes(buf[region.offset : region.end]) == bytes(memoryview(source).cast("B"))
        assert handle.bytes == sum(r.length for _, r in items)


def test_garbage_on_the_grant_socket_is_dropped(consumer, peer):
    buf = np.frombuffer(consumer.allocate("b", 4096), np.uint8)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(consumer.descriptor()["grants"])
    for junk in [b"", b"garbage", b"\x93\x01\xa1t\x90"]:
        sock.send(junk)
    sock.send_multipart([b"two", b"frames"])
    sock.close(linger=1000)
    ctx.term()

    handle = consumer.expect(t := tid(), [Region("b", 0, 4096)])
    peer.call("write", peer=consumer.descriptor(), tid=t, items=[["b", 0, 4096, 6]], wait=30)
    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    assert np.array_equal(buf, pattern(4096, 6))


def test_a_nixl_plane_prints_nothing_on_stdout():
    """Child processes answer their parents on stdout, where NIXL's own logger would print."""
    code = "from common.dataplane import create_dataplane\ncreate_dataplane('nixl').close()\n"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", result.stdout
