"""The data-plane contract, checked for every backend with the producer in another process.

Each test reads as a transfer's story from the consumer's side: allocate, expect, let a peer write, and
check the handle and every byte (inside the regions and around them).
"""

from __future__ import annotations

import uuid

import msgspec
import numpy as np
import pytest
import zmq
from dataplane_harness import start_peers, wait_until
from dataplane_peer import pattern

from common.dataplane import DataPlane, Region, TransferState, create_dataplane, wire

MiB = 1 << 20


def tid() -> str:
    return uuid.uuid4().hex


def as_array(view: memoryview) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8)


def write(peer, consumer: DataPlane, transfer_id: str, items: list[list], **kw) -> dict:
    return peer.call("write", peer=consumer.descriptor(), tid=transfer_id, items=items, **kw)


@pytest.mark.parametrize("size", [1, 4096, MiB, 64 * MiB], ids=["1B", "4KiB", "1MiB", "64MiB"])
def test_bytes_arrive_intact_and_nowhere_else(consumer, peers, size):
    buf = consumer.allocate("buf", size + 64)
    handle = consumer.expect(t := tid(), [Region("buf", 32, size)])
    assert handle.poll() is TransferState.PENDING

    reply = write(peers[0], consumer, t, [["buf", 32, size, 7]], wait=60)

    assert reply["state"] == "success", reply
    assert handle.wait(60) is TransferState.SUCCESS, handle.failure()
    data = as_array(buf)
    assert np.array_equal(data[32 : 32 + size], pattern(size, 7)), "payload corrupted"
    assert not data[:32].any() and not data[32 + size :].any(), "bytes written outside the region"
    assert handle.bytes == size and reply["bytes"] == size
    wait_until(lambda: consumer.bytes_received == size, what="bytes_received counter")
    if size >= MiB:
        assert handle.seconds > 0 and consumer.seconds_received > 0, "transfer time is measured"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["shm", "tcp"], indirect=True)
def test_256_mib_transfer(consumer, peers):
    size = 256 * MiB
    buf = consumer.allocate("big", size)
    handle = consumer.expect(t := tid(), [Region("big", 0, size)])
    write(peers[0], consumer, t, [["big", 0, size, 11]], wait=120)
    assert handle.wait(120) is TransferState.SUCCESS, handle.failure()
    assert np.array_equal(as_array(buf), pattern(size, 11))


def test_200_scattered_blocks_land_in_place(consumer, peers):
    block, nblocks = 16 * 1024, 512
    buf = consumer.allocate("kv", block * nblocks)
    chosen = np.random.default_rng(0).choice(nblocks, 200, replace=False)
    regions = [Region("kv", int(b) * block, block) for b in chosen]
    handle = consumer.expect(t := tid(), regions)

    items = [["kv", r.offset, r.length, seed] for seed, r in enumerate(regions)]
    assert write(peers[0], consumer, t, items[::-1], wait=60)["state"] == "success"

    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    blocks = as_array(buf).reshape(nblocks, block)
    for seed, b in enumerate(chosen):
        assert np.array_equal(blocks[b], pattern(block, seed)), f"block {b} has the wrong bytes"
    untouched = np.setdiff1d(np.arange(nblocks), chosen)
    assert not blocks[untouched].any(), "bytes landed in blocks nobody wrote"


def test_two_producers_write_several_transfers_at_once(consumer, peers):
    part, parts = 2 * MiB, 3
    buf = consumer.allocate("feat", 2 * parts * part)
    jobs = []
    for p, peer in enumerate(peers):
        for i in range(parts):
            offset = (p * parts + i) * part
            items = [
                ["feat", offset, part // 2, 100 + 2 * i + 10 * p],
                ["feat", offset + part // 2, part // 2, 101 + 2 * i + 10 * p],
            ]
            handle = consumer.expect(t := tid(), [Region("feat", offset, part)])
            jobs.append((peer, t, handle, items))
    for peer, t, _, items in jobs:
        write(peer, consumer, t, items)

    for peer, t, handle, items in jobs:
        assert peer.call("wait", tid=t, timeout=60)["state"] == "success"
        assert handle.wait(60) is TransferState.SUCCESS, handle.failure()
        for _, offset, length, seed in items:
            assert np.array_equal(as_array(buf)[offset : offset + length], pattern(length, seed))


def test_bytes_written_before_expect_are_remembered(consumer, peers):
    buf = consumer.allocate("b", 2 * MiB)
    early, half = tid(), tid()
    write(peers[0], consumer, early, [["b", 0, MiB, 1]], wait=30)
    write(peers[0], consumer, half, [["b", MiB, MiB // 2, 2]], wait=30)
    wait_until(lambda: consumer.bytes_received == MiB + MiB // 2, what="prefetched bytes")

    handle = consumer.expect(early, [Region("b", 0, MiB)])
    assert handle.poll() is TransferState.SUCCESS, "a fully prefetched transfer is complete at expect()"
    assert handle.bytes == MiB

    rest = consumer.expect(half, [Region("b", MiB, MiB)])
    assert rest.poll() is TransferState.TRANSFERRING
    write(peers[0], consumer, half, [["b", MiB + MiB // 2, MiB // 2, 3]], wait=30)
    assert rest.wait(30) is TransferState.SUCCESS, rest.failure()
    assert np.array_equal(
        as_array(buf)[: MiB + MiB // 2], np.concatenate([pattern(MiB, 1), pattern(MiB // 2, 2)])
    )


def test_consumer_abort_drops_late_bytes(consumer, peers, backend):
    size = 64 * 1024
    buf = consumer.allocate("b", 3 * size)
    handle = consumer.expect(t := tid(), [Region("b", 0, size), Region("b", size, size)])
    write(peers[0], consumer, t, [["b", 0, size, 1]], wait=30)
    wait_until(lambda: handle.bytes == size, what="the first region")

    handle.abort()
    handle.abort()
    assert handle.poll() is TransferState.FAILED and "abort" in (handle.failure() or "")

    late = write(peers[0], consumer, t, [["b", size, size, 2]], wait=30)
    if backend in ("shm", "cudaipc"):  # the producer reads the consumer's abort board and stops
        assert late["state"] == "failed" and "consumer" in late["failure"], late
    # a later transfer from the same producer is handled after the late bytes
    fence = consumer.expect(f := tid(), [Region("b", 2 * size, size)])
    write(peers[0], consumer, f, [["b", 2 * size, size, 3]], wait=30)
    assert fence.wait(30) is TransferState.SUCCESS, fence.failure()

    data = as_array(buf)
    assert np.array_equal(data[:size], pattern(size, 1)), "bytes written before the abort are kept"
    assert not data[size : 2 * size].any(), "bytes of the aborted transfer landed after abort()"
    assert handle.poll() is TransferState.FAILED


def test_producer_abort_never_completes_on_the_consumer(consumer, peers, backend):
    if backend == "fake":
        pytest.skip("fake writes finish inside write(): there is no mid-way to abort")
    size = 64 * MiB
    consumer.allocate("b", size)
    handle = consumer.expect(t := tid(), [Region("b", 0, size)])
    items = [["b", i * 4 * MiB, 4 * MiB, i] for i in range(16)]

    reply = write(peers[0], consumer, t, items, abort=True, wait=30)

    assert reply["state"] == "failed", reply
    assert handle.wait(0.5) is not TransferState.SUCCESS
    handle.abort()  # the consumer's own deadline
    assert handle.poll() is TransferState.FAILED


def test_malformed_messages_are_dropped_and_the_plane_keeps_working(consumer, peers, backend):
    if backend == "fake":
        pytest.skip("fake has no socket")
    buf = consumer.allocate("b", 4096)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(consumer.descriptor()["endpoint"])
    junk = [
        [b"garbage"],
        [b""],
        [msgspec.msgpack.encode(["t", "b", 0, 4, "bogus-kind"])],
        [msgspec.msgpack.encode({"transfer_id": 1})],
        [wire.encode(wire.Header("x", "b", 0, 4, "data", 0, 4))],  # payload missing
        [wire.encode(wire.Header("x", "b", 0, 4, "data", 0, 4)), b"too long"],
        [wire.encode(wire.Header("x", "b", 0, 4, "send", 0, 4, sender="nobody"))],
        [wire.encode(wire.Header("x", "b", 0, 4, "done")), b"unexpected payload"],
    ]
    for frames in junk:
        sock.send_multipart(frames)
    sock.close(linger=1000)
    ctx.term()

    handle = consumer.expect(t := tid(), [Region("b", 0, 4096)])
    write(peers[0], consumer, t, [["b", 0, 4096, 5]], wait=30)
    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    assert np.array_equal(as_array(buf), pattern(4096, 5))


def test_out_of_bounds_regions_are_rejected(consumer, peers):
    buf = consumer.allocate("b", 4096)
    with pytest.raises(ValueError, match="outside"):
        consumer.expect("x", [Region("b", 4000, 200)])
    with pytest.raises(ValueError, match="unknown buffer"):
        consumer.expect("y", [Region("nope", 0, 1)])

    handle = consumer.expect(t := tid(), [Region("b", 0, 4096)])
    write(peers[0], consumer, t, [["b", 4000, 200, 1]], wait=30)

    assert handle.wait(30) is TransferState.FAILED
    assert "outside" in (handle.failure() or ""), handle.failure()
    assert not as_array(buf).any(), "an out-of-bounds write touched the buffer"
    ok = consumer.expect(t2 := tid(), [Region("b", 0, 4096)])
    write(peers[0], consumer, t2, [["b", 0, 4096, 2]], wait=30)
    assert ok.wait(30) is TransferState.SUCCESS, ok.failure()


def test_freed_buffer_id_can_be_allocated_again(consumer, peers):
    consumer.allocate("b", 4096)
    first = consumer.expect(t := tid(), [Region("b", 0, 4096)])
    write(peers[0], consumer, t, [["b", 0, 4096, 1]], wait=30)
    assert first.wait(30) is TransferState.SUCCESS
    consumer.free("b")
    consumer.free("b")

    buf = consumer.allocate("b", 8192)
    second = consumer.expect(t2 := tid(), [Region("b", 4096, 4096)])
    write(peers[0], consumer, t2, [["b", 4096, 4096, 2]], wait=30)
    assert second.wait(30) is TransferState.SUCCESS, second.failure()
    assert np.array_equal(as_array(buf)[4096:], pattern(4096, 2))
    assert not as_array(buf)[:4096].any()


def test_register_adopts_caller_memory(consumer, peers, backend):
    if backend in ("shm", "cudaipc"):  # host memory must come from allocate() (cudaipc adopts CUDA tensors)
        with pytest.raises(TypeError, match="allocate"):
            consumer.register("x", bytearray(16))
        return
    import torch

    targets = {
        "np": np.zeros(256, dtype=np.float32),
        "ba": bytearray(100),
        "pt": torch.zeros(64, dtype=torch.bfloat16),
    }
    sizes = {"np": 1024, "ba": 100, "pt": 128}
    handles = []
    for name, memory in targets.items():
        consumer.register(name, memory)
        handles.append(h := consumer.expect(t := tid(), [Region(name, 0, sizes[name])]))
        write(peers[0], consumer, t, [[name, 0, sizes[name], 9]], wait=30)
        assert h.wait(30) is TransferState.SUCCESS, h.failure()
    assert np.array_equal(targets["np"].view(np.uint8), pattern(1024, 9))
    assert bytes(targets["ba"]) == pattern(100, 9).tobytes()
    assert np.array_equal(targets["pt"].view(torch.uint8).numpy(), pattern(128, 9))


def test_both_directions_at_once(consumer, peers):
    size = 8 * MiB
    other = peers[1]
    other.call("allocate", buffer_id="in", nbytes=size)
    other.call("expect", tid=(to_other := tid()), regions=[["in", 0, size]])
    buf = consumer.allocate("in", size)
    from_other = consumer.expect(t := tid(), [Region("in", 0, size)])

    write(other, consumer, t, [["in", 0, size, 21]])
    mine = consumer.write(
        other.call("descriptor")["descriptor"], to_other, [(pattern(size, 22), Region("in", 0, size))]
    )

    assert mine.wait(60) is TransferState.SUCCESS, mine.failure()
    assert from_other.wait(60) is TransferState.SUCCESS, from_other.failure()
    assert np.array_equal(as_array(buf), pattern(size, 21))
    checked = other.call("check", tid=to_other, timeout=30, items=[["in", 0, size, 22]])
    assert checked["state"] == "success" and checked["match"], checked
    assert consumer.bytes_sent == size and consumer.bytes_received == size


def test_a_fresh_producer_process_reaches_an_existing_consumer(consumer, backend):
    """A producer that starts after the consumer (and exits after writing) leaves it intact."""
    buf = consumer.allocate("b", MiB)
    (peer,) = start_peers(backend, 1)
    try:
        handle = consumer.expect(t := tid(), [Region("b", 0, MiB)])
        write(peer, consumer, t, [["b", 0, MiB, 4]], wait=30)
        assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    finally:
        peer.close()
    assert np.array_equal(as_array(buf), pattern(MiB, 4))


def test_writes_to_a_closed_consumer_never_succeed_and_can_be_aborted(backend):
    gone = create_dataplane(backend)
    gone.allocate("b", MiB)
    desc = gone.descriptor()
    gone.close()
    with create_dataplane(backend, **({"timeout": 2.0} if backend == "torchdist" else {})) as producer:
        handle = producer.write(desc, tid(), [(pattern(MiB, 1), Region("b", 0, MiB))])
        assert handle.wait(0.3) is not TransferState.SUCCESS
        handle.abort()
        assert handle.poll() is TransferState.FAILED
