"""What only the mooncake backend does: its control page, where sources are read from, and stale notices.

The shared contract (bytes, aborts, prefetch, bad regions, other processes) runs in
test_dataplane_transfers.py; these tests use two planes in one process to look inside.
"""

from __future__ import annotations

import gc
import uuid

import numpy as np
import pytest
import zmq
from dataplane_harness import wait_until
from dataplane_peer import pattern

from common.dataplane import Region, TransferState, create_dataplane, wire
from common.dataplane.mooncake import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

MiB = 1 << 20


def tid() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def producer():
    plane = create_dataplane("mooncake", chunk_bytes=256 * 1024)
    yield plane
    plane.close()


@pytest.fixture
def consumer():
    plane = create_dataplane("mooncake")
    yield plane
    plane.close()


def test_control_page_lists_buffers_and_aborts():
    from common.dataplane.mooncake_page import ControlPage, PageSnapshot

    page = ControlPage()
    first = page.publish("kv", 0x1000, 4096)
    second = page.publish("feat", 0x9000, 64)
    page.post_abort("t-1")
    snap = PageSnapshot(page.words.copy())
    assert snap.lookup("kv").address == 0x1000 and snap.lookup("kv").nbytes == 4096
    assert snap.lookup("feat").generation == second > first
    assert snap.lookup("nope") is None
    assert snap.aborted("t-1") and not snap.aborted("t-2")
    assert not snap.torn()

    page.withdraw("kv")
    again = page.publish("kv", 0x5000, 8192)
    snap = PageSnapshot(page.words.copy())
    assert snap.lookup("kv").address == 0x5000 and snap.lookup("kv").generation == again > second

    words = page.words.copy()
    words[4 + 1] += np.uint64(8)  # a slot caught half-written: its address changed, its checksum not yet
    assert PageSnapshot(words).torn()
    with pytest.raises(ValueError, match="not a mooncake"):
        PageSnapshot(np.zeros_like(words))


def test_views_of_a_producer_pool_are_read_in_place_and_unpinned_with_it(consumer, producer):
    import torch

    buf = consumer.allocate("kv", 4 * MiB)
    pool = torch.arange(MiB, dtype=torch.int32).reshape(4, -1)  # 4 MiB, like a KV pool
    address, nbytes = pool.data_ptr(), pool.numel() * pool.element_size()
    items = [(pool[3], Region("kv", 0, MiB)), (pool[1], Region("kv", 2 * MiB, MiB))]
    handle = consumer.expect(t := tid(), [region for _, region in items])

    sent = producer.write(consumer.descriptor(), t, items)

    assert sent.wait(30) is TransferState.SUCCESS, sent.failure()
    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    assert producer.registry.covers(address, nbytes), "the whole pool is registered once, not staged"
    data = np.frombuffer(buf, dtype=np.int32)
    assert np.array_equal(data[: MiB // 4], pool[3].numpy())
    assert np.array_equal(data[MiB // 2 : 3 * MiB // 4], pool[1].numpy())
    assert not data[MiB // 4 : MiB // 2].any()

    del items, pool
    flush = consumer.expect(t2 := tid(), [Region("kv", MiB, 8)])  # the sender lets go of its last job
    assert producer.write(consumer.descriptor(), t2, [(b"12345678", Region("kv", MiB, 8))]).wait(30).done
    assert flush.wait(30) is TransferState.SUCCESS
    gc.collect()
    assert not producer.registry.covers(address, nbytes), "a pool that is gone stays registered"


def test_small_and_foreign_sources_go_through_staging(consumer, producer):
    buf = consumer.allocate("b", 2 * MiB)
    small = pattern(8192, 1)
    blob = pattern(MiB + 100, 2).tobytes()  # bytes: memory the plane cannot follow, so never pinned
    handle = consumer.expect(t := tid(), [Region("b", 0, 8192), Region("b", 8192, MiB + 100)])

    sent = producer.write(
        consumer.descriptor(), t, [(small, Region("b", 0, 8192)), (blob, Region("b", 8192, MiB + 100))]
    )

    assert sent.wait(30) is TransferState.SUCCESS, sent.failure()
    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    assert not producer.registry.covers(int(small.ctypes.data), small.nbytes)
    data = np.frombuffer(buf, dtype=np.uint8)
    assert np.array_equal(data[:8192], small) and data[8192 : 8192 + MiB + 100].tobytes() == blob


def test_a_buffer_allocated_after_the_descriptor_is_found(consumer, producer):
    descriptor = consumer.descriptor()  # as published at registration
    buf = consumer.allocate("feat-late", 4096)
    handle = consumer.expect(t := tid(), [Region("feat-late", 0, 4096)])

    sent = producer.write(descriptor, t, [(pattern(4096, 3), Region("feat-late", 0, 4096))])

    assert sent.wait(30) is TransferState.SUCCESS, sent.failure()
    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    assert np.array_equal(np.frombuffer(buf, dtype=np.uint8), pattern(4096, 3))


def test_a_transfer_the_consumer_aborted_is_refused_by_the_producer(consumer, producer):
    buf = consumer.allocate("b", 4096)
    handle = consumer.expect(t := tid(), [Region("b", 0, 4096)])
    handle.abort()

    sent = producer.write(consumer.descriptor(), t, [(pattern(4096, 4), Region("b", 0, 4096))])

    assert sent.wait(30) is TransferState.FAILED and "consumer" in (sent.failure() or ""), sent.failure()
    assert not np.frombuffer(buf, dtype=np.uint8).any(), "bytes of an aborted transfer landed"


def test_an_abort_mid_transfer_stops_the_producer_within_a_chunk(consumer, producer):
    size = 64 * MiB
    buf = consumer.allocate("big", size)
    handle = consumer.expect(t := tid(), [Region("big", 0, size)])
    source = pattern(size, 5)

    sent = producer.write(consumer.descriptor(), t, [(source, Region("big", 0, size))])
    wait_until(lambda: handle.bytes > 0, timeout=30, what="the first chunk")
    handle.abort()

    assert sent.wait(30) is TransferState.FAILED and "consumer" in (sent.failure() or ""), sent.failure()
    assert not np.frombuffer(buf, dtype=np.uint8)[-16 * MiB :].any(), "the producer went on after the abort"


def test_a_notice_for_a_buffer_allocated_again_is_refused(consumer, producer):
    from common.dataplane.mooncake_link import Notice, notice_encoder

    consumer.allocate("b", 4096)
    consumer.free("b")
    consumer.allocate("b", 4096)
    handle = consumer.expect(t := tid(), [Region("b", 0, 4096)])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(consumer.descriptor()["endpoint"])
    stale = Notice(generation=1, spans=[(0, 4096)])  # the first "b"'s generation
    sock.send_multipart([wire.encode(wire.Header(t, "b", 0, 4096, "done")), notice_encoder.encode(stale)])
    sock.close(linger=1000)
    ctx.term()

    assert handle.wait(10) is TransferState.FAILED and "freed" in (handle.failure() or ""), handle.failure()


def test_a_peer_on_another_protocol_is_refused_clearly(consumer, producer):
    consumer.allocate("b", 16)
    descriptor = {**consumer.descriptor(), "protocol": "rdma"}

    sent = producer.write(descriptor, tid(), [(b"x" * 16, Region("b", 0, 16))])

    assert sent.wait(10) is TransferState.FAILED and "rdma" in (sent.failure() or ""), sent.failure()


def test_rdma_without_devices_says_so():
    try:
        plane = create_dataplane("mooncake", protocol="rdma")
    except RuntimeError as exc:
        assert "RDMA" in str(exc)
    else:  # a host with RDMA NICs
        plane.close()
    with pytest.raises(ValueError, match="protocol"):
        create_dataplane("mooncake", protocol="carrier-pigeon")
