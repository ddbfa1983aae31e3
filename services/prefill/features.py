"""Encoder features arriving at a prefill instance, and the cache that keeps them.

An encoder offers the features of a content hash (FEATURE_OFFER); if the hash is cached here the answer
is "keep them" and nothing moves. Otherwise a range of the offered size is set aside in the data plane,
a transfer is expected into it, and its id goes back (FEATURE_DEST). When the transfer succeeds the
features are copied out into the LRU cache (so the data-plane buffer is freed at once) and requests
waiting on that hash can go. Offers usually arrive before the request itself does (prefetch).
Destinations are ranges of one long-lived arena buffer (see `arena`), so nothing is mapped per item.

Where the data plane moves this process's device memory (cudaipc on a GPU), the arena and the cache
live on the device: an encoder on the same machine copies its features device to device, and prefill
uses them where they landed. Otherwise both are host memory and prefill moves the features to its
device when it runs them.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from common.dataplane.base import Region, TransferState
from common.protocol import FeatureDest, FeatureOffer
from services.byte_lru import ByteLRU
from services.prefill.arena import Arena
from services.tensor_bytes import tensor_from_bytes

log = logging.getLogger("epd.prefill")
ARENA_ID = "features"  # the arena's data-plane buffer; a role change registers a fresh id


@dataclass(slots=True)
class _Incoming:
    offer: FeatureOffer
    buffer_id: str
    offset: int | None  # in the arena; None: a buffer of its own
    memory: Any  # a memoryview of host memory, or a uint8 device tensor
    handle: Any
    deadline: float


class FeatureStore:
    def __init__(
        self,
        io: Any,
        dataplane: Any,
        cache_bytes: int,
        transfer_timeout_s: float = 30.0,
        arena_bytes: int = 64 * 2**20,
        device: torch.device | str = "cpu",
        arena_id: str = ARENA_ID,
    ) -> None:
        self.io = io
        self.arena_id = arena_id
        self.dataplane = dataplane
        self.cache: ByteLRU[torch.Tensor] = ByteLRU(cache_bytes)
        self.transfer_timeout_s = transfer_timeout_s
        self._incoming: dict[str, _Incoming] = {}  # transfer id -> incoming features
        self._incoming_hashes: set[str] = set()
        self.bytes_received = 0
        self.arena = Arena(arena_bytes)
        device = torch.device(device)
        self.device = device if device.type != "cpu" and device.type in dataplane.devices else None
        self._arena_memory = self._buffer(arena_id, arena_bytes)

    @property
    def incoming_bytes(self) -> int:
        """Bytes set aside for offered features still arriving."""
        return sum(inc.offer.nbytes for inc in self._incoming.values())

    def has(self, hash_: str) -> bool:
        return hash_ in self.cache

    def get(self, hash_: str) -> torch.Tensor | None:
        return self.cache.get(hash_)

    def add(self, hash_: str, features: torch.Tensor) -> None:
        """Features handed over in-process by a co-located encoder."""
        self.cache.put(hash_, features, features.numel() * features.element_size())

    def on_offer(self, offer: FeatureOffer) -> None:
        if offer.hash in self.cache or offer.hash in self._incoming_hashes:
            self.io.send(offer.encoder_address, FeatureDest(hash=offer.hash))
            return
        transfer_id = uuid.uuid4().hex
        offset = self.arena.alloc(offer.nbytes)
        if offset is not None:
            buffer_id, start = self.arena_id, offset
            memory = self._arena_memory[offset : offset + offer.nbytes]
        else:  # larger than what the arena has free: a buffer of its own
            buffer_id, start = f"feat-{transfer_id[:16]}", 0
            memory = self._buffer(buffer_id, offer.nbytes)
        handle = self.dataplane.expect(transfer_id, [Region(buffer_id, start, offer.nbytes)])
        handle.on_done(self.io.wake)
        deadline = time.monotonic() + self.transfer_timeout_s
        self._incoming[transfer_id] = _Incoming(offer, buffer_id, offset, memory, handle, deadline)
        self._incoming_hashes.add(offer.hash)
        reply = FeatureDest(hash=offer.hash, buffer_id=buffer_id, transfer_id=transfer_id, offset=start)
        self.io.send(offer.encoder_address, reply)

    def close(self) -> None:
        """Give the data plane its buffers back (the role is left): transfers still expected are
        aborted, the buffers of their own and the arena freed."""
        for inc in self._incoming.values():
            inc.handle.abort()
            if inc.offset is None:
                self.dataplane.free(inc.buffer_id)
        self._incoming.clear()
        self._incoming_hashes.clear()
        self.dataplane.free(self.arena_id)

    def poll(self) -> bool:
        """Move finished transfers into the cache; True when any arrived."""
        arrived = False
        now = time.monotonic()
        for transfer_id, inc in list(self._incoming.items()):
            state = inc.handle.poll()
            if state is TransferState.SUCCESS:
                features = _features(inc.memory, inc.offer)
                self.add(inc.offer.hash, features)
                self.bytes_received += inc.offer.nbytes
                arrived = True
            elif state is TransferState.FAILED or now > inc.deadline:
                log.warning("features %s did not arrive: %s", inc.offer.hash, inc.handle.failure())
                inc.handle.abort()
            else:
                continue
            del self._incoming[transfer_id]
            self._incoming_hashes.discard(inc.offer.hash)
            del inc.memory
            if inc.offset is not None:
                self.arena.free(inc.offset)
            else:
                self.dataplane.free(inc.buffer_id)
        return arrived

    def _buffer(self, buffer_id: str, nbytes: int) -> Any:
        """Destination memory: on the device when the plane writes it there, else host memory."""
        if self.device is None:
            return self.dataplane.allocate(buffer_id, nbytes)
        memory = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.dataplane.register(buffer_id, memory)
        return memory


def _features(memory: Any, offer: FeatureOffer) -> torch.Tensor:
    """The features that landed in `memory`, as a tensor of their own (the memory is reused)."""
    if isinstance(memory, torch.Tensor):
        return memory.view(getattr(torch, offer.dtype)).view(offer.shape).clone()
    return tensor_from_bytes(memory, offer.dtype, offer.shape, copy=True)
