"""The torch side of torchdist: a rank's device, two-rank groups, and batched point-to-point ops.

Loaded only with the torchdist backend (it imports torch). What lives here and why:

- `local_device`: each rank uses its own process's device (`cuda` is the current device, which
  `CUDA_VISIBLE_DEVICES` makes the process's one GPU; `cuda:N` when named); torch_npu is imported
  only for npu, since importing it changes how torch behaves;
- `identity`: which physical device that is, for the peer's same-device check (torchdist_pairing);
- `pair_group`: a two-rank group without a global default group. It is a `ProcessGroup` with one
  registered backend, as `new_group` builds them, and is entered in torch's table of group ranks, so
  the public `dist.batch_isend_irecv` accepts it and NCCL coalesces a batch into one launch;
- `Lane`: a thread's own stream on the device, so staging copies and waits never queue behind (or
  hold up) the compute thread's stream, and `ready_event` to order a send after the producer's
  kernels that wrote the source;
- `settle`: waiting for a batch on the data plane's thread, never on the compute thread.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _world

from common.dataplane.device_identity import uuid_text

_TAG = 0


def local_device(device: str, dist_backend: str) -> torch.device:
    """Check that the collective library is usable here; the device this rank's tensors live on."""
    kind, _, index = device.partition(":")
    if dist_backend == "gloo":
        if not dist.is_gloo_available():
            raise RuntimeError("torch.distributed was built without gloo")
        return torch.device("cpu")
    if dist_backend == "nccl":
        if not (dist.is_nccl_available() and torch.cuda.is_available()):
            raise RuntimeError("torchdist backend 'nccl' needs a CUDA build of torch and a visible GPU")
        module: Any = torch.cuda
    else:
        try:
            import torch_npu  # noqa: F401  (registers the npu device and HCCL)
        except ImportError as exc:
            raise RuntimeError(
                "torchdist backend 'hccl' needs torch_npu and Huawei's CANN runtime (pip install '.[npu]')"
            ) from exc
        module = torch.npu  # type: ignore[attr-defined]
    number = int(index) if index else module.current_device()
    if number >= module.device_count():
        raise ValueError(f"torchdist device {device!r}: this process sees {module.device_count()} {kind}")
    return torch.device(kind, number)


def identity(device: torch.device) -> dict[str, Any]:
    """Descriptor fields that name the physical device (on CUDA: uuid and PCI bus id)."""
    ident: dict[str, Any] = {"device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        ident["device_uuid"] = uuid_text(getattr(props, "uuid", None))
        if hasattr(props, "pci_bus_id"):
            ident["device_pci"] = (
                f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            )
    return ident


def pair_group(dist_backend: str, store: Any, rank: int, timeout: timedelta, hostname: str, name: str) -> Any:
    """A two-rank process group on `store` (blocks, for gloo, until the other rank joins)."""
    if dist_backend == "hccl":  # torch_npu's own group type; batch_isend_irecv sends its ops one by one
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL  # type: ignore[import-not-found]

        opts = ProcessGroupHCCL.Options()
        opts._timeout = timeout
        group = ProcessGroupHCCL(store, rank, 2, opts)
    else:
        if dist_backend == "gloo":
            gloo_opts = dist.ProcessGroupGloo._Options()
            gloo_opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
            gloo_opts._timeout = timeout
            backend: Any = dist.ProcessGroupGloo(store, rank, 2, gloo_opts)
            kind, device = dist.ProcessGroup.BackendType.GLOO, torch.device("cpu")
        else:
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = timeout
            nccl_opts.is_high_priority_stream = False
            nccl_opts.global_ranks_in_group, nccl_opts.group_name = [0, 1], name  # as new_group sets them
            backend = dist.ProcessGroupNCCL(store, rank, 2, nccl_opts)
            kind, device = dist.ProcessGroup.BackendType.NCCL, torch.device("cuda")
        group = dist.ProcessGroup(store, rank, 2)
        group._set_default_backend(kind)
        group._register_backend(device, kind, backend)
        group._set_group_name(name)
    _world.pg_group_ranks[group] = {0: 0, 1: 1}  # the pair's ranks are its own: 0 consumer, 1 producer
    return group


def release_group(group: Any, dist_backend: str) -> None:
    """Forget a pair's group; on accelerators abort its communicators (nothing more will be sent)."""
    _world.pg_group_ranks.pop(group, None)
    _world.pg_coalesce_state.pop(group, None)
    if dist_backend != "gloo":
        with contextlib.suppress(Exception):
            group.abort()


def post(op: Any, tensors: Sequence[torch.Tensor], group: Any, peer: int) -> list[Any]:
    """Start sends (`dist.isend`) or receives (`dist.irecv`) of `tensors` with `peer` as one batch."""
    return dist.batch_isend_irecv(
        [dist.P2POp(op, t, group=group, group_peer=peer, tag=_TAG) for t in tensors]
    )


def settle(works: Sequence[Any], device: torch.device, timeout: float) -> None:
    """Block this (data-plane) thread until a batch has finished; raise its error, if any.

    gloo: `wait()` blocks, bounded by the group's timeout (its works only report completion once
    waited on). nccl/hccl: `wait()` would only order a stream, so the works are polled, backing off
    to 1 ms, and then waited on to raise a failure they recorded.
    """
    if device.type != "cpu":
        deadline = time.monotonic() + timeout
        delay = 20e-6
        while not all(work.is_completed() for work in works):
            if time.monotonic() > deadline:
                raise TimeoutError(f"point-to-point batch not finished after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)
    for work in works:
        work.wait()


def ready_event(tensor: torch.Tensor) -> Any | None:
    """An event on the caller's current stream, recorded after the work that wrote `tensor` (None for
    host memory): the data-plane thread waits for it on its own stream before it sends."""
    if tensor.device.type == "cpu":
        return None
    module = torch.get_device_module(tensor.device)
    event = module.Event()
    event.record(module.current_stream(tensor.device))
    return event


class Lane:
    """One thread's way onto the plane's device: bound to it, on a stream of its own (made on first
    use). On host memory it does nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._module: Any = None if device.type == "cpu" else torch.get_device_module(device)
        self._stream: Any = None
        self._context: Any = None

    def __enter__(self) -> Lane:
        if self._module is not None:
            self._module.set_device(self.device)
            if self._stream is None:
                self._stream = self._module.Stream(self.device)
            self._context = self._module.stream(self._stream)
            self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(*exc)

    def wait(self, event: Any | None) -> None:
        """Make this lane's stream wait for `event` (a source's producer kernels); None: nothing."""
        if event is not None and self._stream is not None:
            self._stream.wait_event(event)
