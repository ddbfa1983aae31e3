"""Bulk transfer of encoder features and KV blocks, apart from the ZeroMQ control plane.

The consumer owns destination memory and publishes a descriptor; producers write regions of it; each
side follows a transfer through a TransferHandle (poll / wait / abort). Backends: fake (in-process),
shm (one host), tcp (anywhere), cudaipc (one host, CUDA device to device), torchdist (torch.distributed: NCCL, HCCL, gloo), mooncake (Mooncake
Transfer Engine: RDMA or TCP), nixl (NIXL over UCX). Importing this package loads no backend and never
torch: `create_dataplane` imports the one asked for.
"""

from common.dataplane.base import DataPlane, Region, TransferHandle, TransferState
from common.dataplane.factory import BACKENDS, create_dataplane, resolve_backend, same_host

__all__ = [
    "BACKENDS",
    "DataPlane",
    "Region",
    "TransferHandle",
    "TransferState",
    "create_dataplane",
    "resolve_backend",
    "same_host",
]
