"""cudaipc between two processes on one GPU: device tensors cross device to device by CUDA IPC handle
(host memory on either side copied to or from the device), in both directions; a buffer freed and
registered again under its id is mapped afresh; a consumer's abort stops a producer's later writes; a
producer in the consumer's own process uses the buffer itself. The peer is device_peer.py in a child."""

from __future__ import annotations

import pytest
import torch

from common.dataplane import Region, TransferState, create_dataplane
from tests.gpu.device_peer import pattern
from tests.gpu.gpu_peer import GpuPeer, MiB, sees_only


def _write_and_check(here, peer, theirs, name: str, source: torch.Tensor, seed: int, offset: int = 32):
    size = source.numel()
    peer.call("expect", tid=name, regions=[[name, offset, size]])
    handle = here.write(theirs, name, [(source, Region(name, offset, size))])
    assert handle.wait(60) is TransferState.SUCCESS, f"{name}: {handle.failure()}"
    landed = peer.call("wait", tid=name, timeout=60)
    assert landed["state"] == "success" and landed["bytes"] == size, f"{name}: {landed}"
    checked = peer.call("check", buffer_id=name, offset=offset, length=size, seed=seed)
    assert checked == {"match": True, "untouched_elsewhere": True}, f"{name}: {checked}"


def test_device_memory_crosses_processes_on_one_gpu_both_ways():
    with GpuPeer(sees_only(0), backend="cudaipc") as peer, create_dataplane("cudaipc") as here:
        assert here.devices == ("cpu", "cuda")
        theirs = peer.call("descriptor")["descriptor"]
        cases = {  # transfer: (source memory, destination memory, bytes)
            "device-to-device": ("cuda", "register", 64 * MiB),
            "host-to-device": ("cpu", "register", MiB + 3),
            "device-to-host": ("cuda", "allocate", 5 * MiB),
        }
        for seed, (name, (source_device, destination, size)) in enumerate(cases.items()):
            peer.call(destination, buffer_id=name, nbytes=size + 64)
            # queued on this thread's stream just before write(): the copy must wait for it
            _write_and_check(here, peer, theirs, name, pattern(size, seed, source_device), seed)

        mine = torch.zeros(8 * MiB, dtype=torch.uint8, device="cuda")
        here.register("in", mine)
        incoming = here.expect("to-here", [Region("in", 0, 8 * MiB)])
        peer.call(
            "write", peer=here.descriptor(), tid="to-here", region=["in", 0, 8 * MiB], seed=11, where="device"
        )
        assert incoming.wait(60) is TransferState.SUCCESS, incoming.failure()
        assert torch.equal(mine.cpu(), pattern(8 * MiB, 11)), "bytes from the other process are wrong"


def test_a_buffer_registered_again_under_its_id_is_mapped_afresh():
    with GpuPeer(sees_only(0), backend="cudaipc") as peer, create_dataplane("cudaipc") as here:
        theirs = peer.call("descriptor")["descriptor"]
        peer.call("register", buffer_id="b", nbytes=MiB + 64)
        _write_and_check(here, peer, theirs, "b", pattern(MiB, 1, "cuda"), 1)
        peer.call("free", buffer_id="b")
        peer.call("register", buffer_id="b", nbytes=MiB + 64)  # new memory, same id
        peer.call("expect", tid="again", regions=[["b", 32, MiB]])
        handle = here.write(theirs, "again", [(pattern(MiB, 2, "cuda"), Region("b", 32, MiB))])
        assert handle.wait(60) is TransferState.SUCCESS, handle.failure()
        assert peer.call("wait", tid="again", timeout=60)["state"] == "success"
        checked = peer.call("check", buffer_id="b", offset=32, length=MiB, seed=2)
        assert checked == {"match": True, "untouched_elsewhere": True}, "the write went to the freed memory"


def test_a_consumer_abort_stops_later_writes():
    with GpuPeer(sees_only(0), backend="cudaipc") as peer, create_dataplane("cudaipc") as here:
        theirs = peer.call("descriptor")["descriptor"]
        peer.call("register", buffer_id="b", nbytes=2 * MiB)
        peer.call("expect", tid="t", regions=[["b", 0, MiB], ["b", MiB, MiB]])
        first = here.write(theirs, "t", [(pattern(MiB, 3, "cuda"), Region("b", 0, MiB))])
        assert first.wait(60) is TransferState.SUCCESS, first.failure()
        peer.call("abort", tid="t")

        late = here.write(theirs, "t", [(pattern(MiB, 4, "cuda"), Region("b", MiB, MiB))])

        assert late.wait(60) is TransferState.FAILED and "consumer" in (late.failure() or ""), late.failure()
        assert peer.call("wait", tid="t", timeout=10)["state"] == "failed"
        checked = peer.call("check", buffer_id="b", offset=0, length=MiB, seed=3)
        assert checked == {"match": True, "untouched_elsewhere": True}, "bytes landed after the abort"


def test_a_producer_in_the_consumers_process_writes_the_buffer_itself():
    with create_dataplane("cudaipc") as consumer, create_dataplane("cudaipc") as producer:
        buf = torch.zeros(MiB, dtype=torch.uint8, device="cuda")
        consumer.register("b", buf)
        arrival = consumer.expect("t", [Region("b", 0, MiB)])
        handle = producer.write(consumer.descriptor(), "t", [(pattern(MiB, 5, "cuda"), Region("b", 0, MiB))])
        assert handle.wait(60) is TransferState.SUCCESS, handle.failure()
        assert arrival.wait(60) is TransferState.SUCCESS, arrival.failure()
        assert torch.equal(buf.cpu(), pattern(MiB, 5))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="peer GPUs need two devices")
def test_device_memory_crosses_to_a_peer_gpu():
    with GpuPeer(sees_only(1), backend="cudaipc") as peer, create_dataplane("cudaipc") as here:
        theirs = peer.call("descriptor")["descriptor"]
        peer.call("register", buffer_id="peer", nbytes=16 * MiB + 64)
        _write_and_check(here, peer, theirs, "peer", pattern(16 * MiB, 6, "cuda:0"), 6)
