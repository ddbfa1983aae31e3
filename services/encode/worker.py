"""The Encode role: batch images across requests, run the encoder, push features to prefill.

Life of an item: an ENCODE message brings the image bytes (or only the hash, when this encoder holds
its features); items queue up; `run_batch` decodes, preprocesses and encodes up to `max_batch_items`
of them in one encoder call; the features go into an LRU cache keyed by content hash and are offered
to the prefill instance the gateway chose. That instance answers with a destination buffer (or with
nothing, when it holds the hash already) and the bytes move over the data plane. A prefill role in the
same process gets the tensor itself: no copy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from common.dataplane.base import Region, TransferState
from common.log import get_logger
from common.media import MediaError, decode_image
from common.protocol import Encode, FeatureDest, FeatureOffer, RequestError
from services.byte_lru import ByteLRU
from services.tensor_bytes import byte_view, dtype_name

log = get_logger("epd.encode")


@dataclass(slots=True)
class _Item:
    request_id: str
    hash: str
    data: bytes | None
    dest: Encode


class EncodeWorker:
    def __init__(
        self,
        family: Any,
        io: Any,
        dataplane: Any,
        *,
        cache_bytes: int = 1 << 30,
        max_batch_items: int = 16,
        local_prefill: Any = None,
        local_id: str = "",
    ) -> None:
        self.family = family
        self.io = io
        self.dataplane = dataplane
        self.cache: ByteLRU[torch.Tensor] = ByteLRU(cache_bytes)
        self.max_batch_items = max_batch_items
        self.local_prefill = local_prefill
        self.local_id = local_id
        self.queue: deque[_Item] = deque()
        self._offers: dict[tuple[str, str], torch.Tensor] = {}  # (hash, prefill address) -> features
        self._writes: list[Any] = []  # data plane handles in flight, with their sources
        self._dest_dataplane: dict[str, dict] = {}  # prefill id -> its data plane descriptor
        self.items_encoded = 0

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def has_work(self) -> bool:
        return bool(self.queue)

    # ---- messages ----------------------------------------------------------------------------------

    def on_encode(self, msg: Encode, frames: list[Any]) -> None:
        for item in msg.items:
            features = self.cache.get(item.hash)
            if features is not None:
                self._deliver(item.hash, features, msg)
                continue
            if not 0 <= item.frame < len(frames):
                self._fail(msg.request_id, f"image {item.hash} was not sent and is not cached", 400)
                return
            self.queue.append(_Item(msg.request_id, item.hash, bytes(frames[item.frame].buffer), msg))

    def on_feature_dest(self, msg: FeatureDest) -> None:
        features = self._offers.pop((msg.hash, msg.sender), None)
        if features is None or not msg.buffer_id:
            return  # the prefill instance holds these features already
        dest = self._dest_dataplane.get(msg.sender, {})
        region = Region(msg.buffer_id, msg.offset, features.numel() * features.element_size())
        source = byte_view(features) if features.device.type == "cpu" else features  # a device plane reads it
        handle = self.dataplane.write(dest, msg.transfer_id, [(source, region)])
        handle.on_done(self.io.wake)
        self._writes.append((handle, features))

    def on_abort(self, request_id: str) -> None:
        self.queue = deque(i for i in self.queue if i.request_id != request_id)

    def poll(self) -> None:
        still = []
        for handle, features in self._writes:
            state = handle.poll()
            if state is TransferState.FAILED:
                log.warning("feature transfer failed", transfer=handle.transfer_id, error=handle.failure())
            elif state is not TransferState.SUCCESS:
                still.append((handle, features))
        self._writes = still

    # ---- compute -----------------------------------------------------------------------------------

    def run_batch(self) -> None:
        """Encode up to `max_batch_items` queued images in one encoder call."""
        batch: list[_Item] = []
        repeats: list[_Item] = []  # the same image twice among the queued items: encode it once
        seen: set[str] = set()
        while self.queue and len(batch) < self.max_batch_items:
            item = self.queue.popleft()
            cached = self.cache.get(item.hash)
            if cached is not None:
                self._deliver(item.hash, cached, item.dest)
            elif item.hash in seen:
                repeats.append(item)
            else:
                seen.add(item.hash)
                batch.append(item)
        ready, prepared = [], []
        for item in batch:
            try:
                prepared.append(self.family.preprocess(decode_image(item.data or b"")))
                ready.append(item)
            except (MediaError, ValueError) as exc:
                self._fail(item.request_id, f"image could not be processed: {exc}", 400)
        if ready:
            for item, features in zip(ready, self.family.encode(prepared), strict=True):
                features = features.contiguous()
                self.cache.put(item.hash, features, features.numel() * features.element_size())
                self.items_encoded += 1
                self._deliver(item.hash, features, item.dest)
                log.info(
                    "encoded", request_id=item.request_id, image=item.hash[:12], tokens=features.shape[0]
                )
        for item in repeats:
            features = self.cache.get(item.hash)
            if features is None:
                self._fail(item.request_id, "image could not be processed", 400)
            else:
                self._deliver(item.hash, features, item.dest)

    # ---- helpers -----------------------------------------------------------------------------------

    def _deliver(self, hash_: str, features: torch.Tensor, dest: Encode) -> None:
        if self.local_prefill is not None and dest.prefill_id == self.local_id:
            self.local_prefill.add_features(hash_, features)
            return
        if features.device.type not in self.dataplane.devices:
            features = features.cpu()  # this plane moves host memory only (a no-op on CPU)
        self._offers[(hash_, dest.prefill_id)] = features
        self._dest_dataplane[dest.prefill_id] = dest.prefill_dataplane
        offer = FeatureOffer(
            hash=hash_,
            nbytes=features.numel() * features.element_size(),
            dtype=dtype_name(features),
            shape=list(features.shape),
            encoder_address=self.io.address,
        )
        self.io.send(dest.prefill_address, offer)

    def _fail(self, request_id: str, message: str, status: int) -> None:
        self.io.to_gateway(RequestError(request_id=request_id, message=message, status=status))
