"""torchdist over NCCL between two processes: device tensors move GPU to GPU (and host memory on
either side is staged through the device), both directions at once; two processes on one GPU are
refused, on both sides, with a message naming host staging and cudaipc. The peer is
device_peer.py in a child that sees one GPU through CUDA_VISIBLE_DEVICES, as a stack's child does."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from common.dataplane import Region, TransferState
from tests.gpu.device_peer import pattern
from tests.gpu.gpu_peer import GpuPeer, MiB, sees_only


def plane(**options: Any):
    from common.dataplane.torchdist import TorchDistDataPlane

    return TorchDistDataPlane(**options)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL pairs ranks on two different GPUs")
def test_nccl_moves_device_tensors_between_processes_on_two_gpus():
    with GpuPeer(sees_only(1)) as peer, plane(device="cuda:0", chunk_bytes=4 * MiB, batch_chunks=2) as here:
        assert here.dist_backend == "nccl" and here.devices == ("cpu", "cuda")
        theirs = peer.call("descriptor")["descriptor"]
        assert theirs["dist_backend"] == "nccl" and theirs["device_uuid"] != here.descriptor()["device_uuid"]
        cases = {  # transfer: (source memory, destination memory, bytes)
            "device-to-device": ("cuda:0", "register", 64 * MiB),  # 16 chunks in 8 batches, no host bounce
            "host-to-device": ("cpu", "register", MiB + 3),  # staged through this GPU
            "device-to-host": ("cuda:0", "allocate", 5 * MiB),  # staged through the peer's GPU
        }
        for seed, (name, (source_device, destination, size)) in enumerate(cases.items()):
            peer.call(destination, buffer_id=name, nbytes=size + 64)
            peer.call("expect", tid=name, regions=[[name, 32, size]])
            source = pattern(size, seed, source_device)  # queued on this thread's stream just before
            handle = here.write(theirs, name, [(source, Region(name, 32, size))])
            assert handle.wait(120) is TransferState.SUCCESS, f"{name}: {handle.failure()}"
            landed = peer.call("wait", tid=name, timeout=60)
            assert landed["state"] == "success" and landed["bytes"] == size, f"{name}: {landed}"
            checked = peer.call("check", buffer_id=name, offset=32, length=size, seed=seed)
            assert checked == {"match": True, "untouched_elsewhere": True}, f"{name}: {checked}"

        mine = torch.zeros(8 * MiB, dtype=torch.uint8, device="cuda:0")
        here.register("in", mine)
        incoming = here.expect("to-here", [Region("in", 0, 8 * MiB)])
        peer.call("register", buffer_id="both", nbytes=8 * MiB)
        peer.call("expect", tid="to-peer", regions=[["both", 0, 8 * MiB]])
        peer.call(
            "write", peer=here.descriptor(), tid="to-here", region=["in", 0, 8 * MiB], seed=11, where="device"
        )
        outgoing = here.write(
            theirs, "to-peer", [(pattern(8 * MiB, 12, "cuda:0"), Region("both", 0, 8 * MiB))]
        )
        assert incoming.wait(120) is TransferState.SUCCESS, incoming.failure()
        assert outgoing.wait(120) is TransferState.SUCCESS, outgoing.failure()
        assert torch.equal(mine.cpu(), pattern(8 * MiB, 11)), "bytes from the peer's GPU are wrong"
        assert peer.call("wait", tid="to-here", timeout=60)["state"] == "success"
        assert peer.call("check", buffer_id="both", offset=0, length=8 * MiB, seed=12)["match"]


def test_two_processes_on_one_gpu_are_refused_naming_host_staging_and_cudaipc():
    with GpuPeer(sees_only(0)) as peer, plane(device="cuda") as here:
        mine = here.descriptor()
        assert mine["dist_backend"] == "nccl" and mine["device_uuid"], "a CUDA plane names its GPU"
        theirs = peer.call("descriptor")["descriptor"]
        assert theirs["device_uuid"] == mine["device_uuid"], "the child sees the same GPU"
        peer.call("register", buffer_id="b", nbytes=MiB)
        peer.call("expect", tid="t", regions=[["b", 0, MiB]])

        handle = here.write(
            theirs, "t", [(torch.ones(MiB, dtype=torch.uint8, device="cuda"), Region("b", 0, MiB))]
        )

        assert handle.wait(30) is TransferState.FAILED
        failure = handle.failure() or ""
        assert "cannot pair two ranks on one device" in failure and "cudaipc" in failure, failure
        assert "host staging" in failure, failure
        refused = peer.call("wait", tid="t", timeout=30)
        assert refused["state"] == "failed" and "cudaipc" in (refused["failure"] or ""), refused
        assert peer.call("check", buffer_id="b", offset=0, length=0, seed=0)["untouched_elsewhere"]
