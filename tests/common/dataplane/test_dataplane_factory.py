"""Choosing a backend, telling hosts apart, and keeping torch out of processes that do not need it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.dataplane import BACKENDS, create_dataplane, resolve_backend, same_host
from common.dataplane.channel import HOST_IDENTITY

REPO = Path(__file__).resolve().parents[3]


def test_auto_is_shm_on_one_host_cudaipc_for_cuda_memory_and_tcp_across_hosts():
    assert resolve_backend("auto", same_host=True) == "shm"
    assert resolve_backend("auto", same_host=True, device="npu") == "shm"
    assert resolve_backend("auto", same_host=True, device="cuda") == "cudaipc"
    assert resolve_backend("auto", same_host=True, device="cuda:1") == "cudaipc"
    assert resolve_backend("auto", same_host=False, device="cuda") == "tcp"
    assert resolve_backend("auto", same_host=False) == "tcp"
    assert resolve_backend("torchdist", same_host=True, device="cuda") == "torchdist"
    assert BACKENDS == ("fake", "shm", "tcp", "cudaipc", "torchdist", "mooncake", "nixl")


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="fake, shm, tcp, cudaipc, torchdist, mooncake, nixl"):
        resolve_backend("carrier-pigeon", same_host=True)
    with pytest.raises(ValueError, match="unknown data-plane backend"):
        create_dataplane("rdma")


@pytest.mark.parametrize("name", ["shm", "tcp", "cudaipc"])
def test_descriptor_is_plain_data_with_host_identity(name):
    import msgspec

    with create_dataplane(name) as plane:
        desc = plane.descriptor()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(desc)) == desc
    assert desc["backend"] == name and desc["endpoint"].startswith("tcp://127.0.0.1:")
    assert same_host(desc, dict(HOST_IDENTITY))


def test_same_host_needs_matching_hostname_and_boot():
    here = {"hostname": "a", "boot_id": "1"}
    assert same_host(here, {"hostname": "a", "boot_id": "1", "endpoint": "x"})
    assert not same_host(here, {"hostname": "b", "boot_id": "1"})
    assert not same_host(here, {"hostname": "a", "boot_id": "2"})
    assert not same_host({"id": "fake"}, {"id": "fake"}), "unknown identity is never the same host"


def test_importing_the_data_plane_does_not_import_torch():
    code = (
        "import sys\n"
        "import common.dataplane, common.dataplane.fake, common.dataplane.shm, common.dataplane.tcp\n"
        "from common.dataplane import create_dataplane\n"
        "for name in ('fake', 'shm', 'tcp'):\n"
        "    create_dataplane(name).close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_torchdist_names_unavailable_collective_libraries_clearly():
    import torch

    from common.dataplane.torchdist import TorchDistDataPlane

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nccl.*CUDA"):
            TorchDistDataPlane(dist_backend="nccl")
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="torch_npu"):
            TorchDistDataPlane(dist_backend="hccl")
    with pytest.raises(ValueError, match="gloo, nccl, hccl"):
        TorchDistDataPlane(dist_backend="mpi")
