"""A device data plane in a child process that sees one GPU, as a stack's child does (device_peer.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tests.common.dataplane.dataplane_harness import RemotePeer

REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).parent / "device_peer.py"
MiB = 1 << 20


def sees_only(index: int) -> dict[str, str]:
    """This environment with CUDA_VISIBLE_DEVICES narrowed to our device `index`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {**os.environ, "CUDA_VISIBLE_DEVICES": entries[index].strip(), "PYTHONPATH": str(REPO)}


def GpuPeer(env: dict[str, str], backend: str = "torchdist", **options: Any) -> RemotePeer:  # noqa: N802
    """A `backend` plane on `cuda` in a child process (device_peer.py), ready for `call`s."""
    return RemotePeer(backend, options, args=["cuda"], script=PEER, env=env).ready(120)
