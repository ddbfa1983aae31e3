"""torchdist without a GPU: the collective library follows the device, pairs that cannot work are
refused with the reason on both sides, tensors of any dtype move (in several batches), and device
memory a plane cannot move is refused clearly. The GPU side (nccl between two processes) is in
tests/gpu/test_torchdist_nccl.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.dataplane import Region, TransferState
from common.dataplane.base import device_type
from common.dataplane.torchdist import TorchDistDataPlane
from common.dataplane.torchdist_device import settle
from common.dataplane.torchdist_pairing import choose, pairing_problem, shared_device

REPO = Path(__file__).resolve().parents[3]
HOST = {"hostname": "node-a", "boot_id": "boot-1"}


@pytest.mark.parametrize(
    ("device", "dist_backend", "expected"),
    [
        (None, None, ("cpu", "gloo")),
        ("cpu", None, ("cpu", "gloo")),
        ("cuda", None, ("cuda", "nccl")),
        ("cuda:1", None, ("cuda:1", "nccl")),
        ("npu", None, ("npu", "hccl")),
        ("npu:3", "hccl", ("npu:3", "hccl")),
        (None, "nccl", ("cuda", "nccl")),  # a library named alone picks its kind of device
        (None, "gloo", ("cpu", "gloo")),
    ],
)
def test_the_collective_library_follows_the_device(device, dist_backend, expected):
    assert choose(device, dist_backend) == expected


@pytest.mark.parametrize(
    ("device", "dist_backend", "message"),
    [
        ("cpu", "nccl", "does not go with device 'cpu'"),
        ("cuda", "gloo", "cuda memory moves over 'nccl'"),
        ("xpu", None, "cannot run on device 'xpu'"),
        ("cuda:first", None, "cannot run on device"),
        (None, "mpi", "gloo, nccl, hccl"),
    ],
)
def test_a_device_and_a_library_that_disagree_are_refused(device, dist_backend, message):
    with pytest.raises(ValueError, match=message):
        choose(device, dist_backend)


def gpu(uuid: str = "", pci: str = "", **host: str) -> dict:
    return {
        "dist_backend": "nccl",
        "device": "cuda",
        "device_uuid": uuid,
        "device_pci": pci,
        **(host or HOST),
    }


def test_two_ranks_on_one_gpu_are_refused_naming_host_staging_and_cudaipc():
    problem = pairing_problem(gpu("GPU-1", "0000:3b:00"), gpu("GPU-1", "0000:3b:00"))
    assert problem is not None, "one GPU shared by both ends must be refused"
    assert "GPU-1" in problem and "nccl cannot pair two ranks on one device" in problem
    assert "host staging" in problem and "cudaipc" in problem, problem


def test_the_same_gpu_is_recognised_by_uuid_even_across_host_names():
    """Two containers on one machine have different host names but see the same GPU uuid."""
    assert shared_device(
        gpu("GPU-1", hostname="box-1", boot_id="b"), gpu("GPU-1", hostname="box-2", boot_id="b")
    )
    assert not shared_device(gpu("GPU-1", "0000:3b:00"), gpu("GPU-2", "0000:3b:00")), "uuids decide"


def test_without_uuids_the_pci_bus_id_counts_on_one_host_only():
    assert shared_device(gpu(pci="0000:3b:00"), gpu(pci="0000:3b:00"))
    assert not shared_device(gpu(pci="0000:3b:00"), gpu(pci="0000:3b:00", hostname="node-b", boot_id="x"))
    assert not shared_device(gpu(pci="0000:3b:00"), gpu(pci="0000:5e:00"))
    assert not shared_device(gpu(), gpu()), "a descriptor that names no device is not refused"


def test_host_memory_pairs_and_different_gpus_are_fine():
    cpu = {"dist_backend": "gloo", "device": "cpu", **HOST}
    assert pairing_problem(cpu, dict(cpu)) is None, "gloo pairs two processes on one host"
    assert pairing_problem(gpu("GPU-1"), gpu("GPU-2")) is None


def test_planes_on_different_kinds_of_device_cannot_pair():
    problem = pairing_problem({"dist_backend": "gloo", "device": "cpu"}, gpu("GPU-1"))
    assert problem is not None and "'nccl'" in problem and "'gloo'" in problem, problem


@pytest.fixture
def pair():
    with (
        TorchDistDataPlane(timeout=10) as consumer,
        TorchDistDataPlane(timeout=10, chunk_bytes=1000, batch_chunks=3) as producer,
    ):
        yield consumer, producer


def test_a_refused_pair_fails_both_handles_with_the_reason(pair):
    consumer, producer = pair
    same_gpu = {"device": "cuda", "device_uuid": "GPU-shared"}
    producer.identity = same_gpu  # as if both planes were on one GPU
    buf = consumer.allocate("b", 64)
    expected = consumer.expect("t", [Region("b", 0, 64)])

    handle = producer.write(
        {**consumer.descriptor(), **same_gpu}, "t", [(bytes(range(64)), Region("b", 0, 64))]
    )

    assert handle.wait(10) is TransferState.FAILED
    assert "cudaipc" in (handle.failure() or ""), handle.failure()
    assert expected.wait(10) is TransferState.FAILED, "the producer's refusal reaches the consumer"
    assert "cudaipc" in (expected.failure() or ""), expected.failure()
    assert not any(buf), "a refused pair moved bytes"


def test_tensors_of_any_dtype_move_in_several_batches(pair):
    consumer, producer = pair
    assert consumer.dist_backend == "gloo" and consumer.devices == ("cpu",)
    assert consumer.descriptor()["device"] == "cpu"
    dest = torch.zeros(4096, dtype=torch.float32)
    consumer.register("t", dest)
    halves = torch.arange(1024, dtype=torch.bfloat16), np.arange(512, dtype=np.int64)
    regions = [Region("t", 0, 2048), Region("t", 2048, 4096), Region("t", 8192, 3)]
    expected = consumer.expect("x", regions)

    sources = [
        halves[0],
        halves[1],
        torch.tensor([[1, 0], [2, 0], [3, 0]], dtype=torch.uint8)[:, 0],
    ]  # strided
    handle = producer.write(consumer.descriptor(), "x", list(zip(sources, regions, strict=True)))

    assert handle.wait(30) is TransferState.SUCCESS, handle.failure()
    assert expected.wait(30) is TransferState.SUCCESS, expected.failure()
    raw = dest.view(torch.uint8)
    assert torch.equal(raw[:2048].view(torch.bfloat16), halves[0]), "chunks of 1000 bytes, 3 per batch"
    assert np.array_equal(raw[2048:6144].numpy().view(np.int64), halves[1])
    assert raw[8192:8195].tolist() == [1, 2, 3] and not raw[6144:8192].any() and not raw[8195:].any()


def test_device_memory_the_plane_cannot_move_is_refused_clearly(pair):
    consumer, producer = pair
    elsewhere = torch.empty(64, dtype=torch.uint8, device="meta")  # not host memory, not the plane's
    assert device_type(elsewhere) == "meta" and device_type(bytearray(1)) == "cpu"
    with pytest.raises(ValueError, match="moves host memory; this destination is on meta"):
        consumer.register("d", elsewhere)
    consumer.allocate("b", 64)
    with pytest.raises(ValueError, match="this source is on meta"):
        producer.write(consumer.descriptor(), "t", [(elsewhere, Region("b", 0, 64))])


class FakeWork:
    """A batch's work as NCCL reports it: complete after some polls; wait() raises what went wrong."""

    def __init__(self, polls: int, error: str | None = None) -> None:
        self.polls, self.error, self.waited = polls, error, False

    def is_completed(self) -> bool:
        self.polls -= 1
        return self.polls <= 0

    def wait(self) -> None:
        if self.error:
            raise RuntimeError(self.error)
        self.waited = True


def test_device_batches_are_polled_on_the_plane_thread_then_waited_for_their_errors():
    works = [FakeWork(5), FakeWork(1)]
    settle(works, torch.device("cuda"), timeout=5)
    assert all(w.waited for w in works) and works[0].polls <= 0
    with pytest.raises(RuntimeError, match="peer gone"):
        settle([FakeWork(2, error="peer gone")], torch.device("cuda"), timeout=5)
    with pytest.raises(TimeoutError, match="not finished"):
        settle([FakeWork(10**9)], torch.device("cuda"), timeout=0.05)


def test_a_host_plane_never_imports_torch_npu_and_the_choice_never_imports_torch():
    code = (
        "import sys\n"
        "from common.dataplane.torchdist_pairing import choose\n"
        "assert choose('npu') == ('npu', 'hccl')\n"
        "assert 'torch' not in sys.modules, 'choosing the library imported torch'\n"
        "from common.dataplane import create_dataplane\n"
        "create_dataplane('torchdist', device='cpu').close()\n"
        "assert 'torch_npu' not in sys.modules, 'a gloo plane imported torch_npu'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
