"""The Encode role: batch images, videos and audio across requests, run the encoder, push features to prefill.

Life of an item: an ENCODE message brings the image, video or audio bytes (or only the hash, when this
encoder holds its features); items queue up; `run_batch` decodes, preprocesses (a video or audio clip:
see services/encode/media_items.py) and encodes them together in one encoder call, images, videos and
clips alike, as many as fit one budget of encoder output tokens (`max_batch_tokens`, and at most
`max_batch_items`; one item over the budget runs alone); the features go into an LRU cache keyed by
content hash and are offered to the prefill instance the gateway chose. That instance answers with a destination buffer (or with
nothing, when it holds the hash already) and the bytes move over the data plane. A prefill role in the
same process gets the tensor itself: no copy.

An ENCODE is checked before use (ids, a bounded number of items, frames that exist): a bad one fails
its request (400) and is counted in `refusals`. An encoder call that raises fails the requests of
that batch (500); the worker goes on with the next.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from common.dataplane.base import Region, TransferState
from common.log import get_logger
from common.media import MediaError
from common.protocol import Encode, FeatureDest, FeatureOffer, MMItem, RequestError
from common.stage_histograms import CacheCounts, PhaseHistograms
from services.byte_lru import ByteLRU
from services.encode.media_items import item_problem, prepare_item
from services.tensor_bytes import byte_view, dtype_name
from services.wire_checks import Refusals, id_problem, ids_problem

log = get_logger("epd.encode")
MAX_ITEMS = 256  # images of one ENCODE (the gateway's own limit is lower: 8 per request by default)


def encode_problem(msg: Encode, num_frames: int) -> str | None:
    if problem := ids_problem(msg, "request_id", "prefill_id", "prefill_address"):
        return problem
    if not 1 <= len(msg.items) <= MAX_ITEMS:
        return f"items: between 1 and {MAX_ITEMS} images, got {len(msg.items)}"
    for i, item in enumerate(msg.items):
        if problem := id_problem(f"items[{i}].hash", item.hash):
            return problem
        if item.frame >= num_frames or item.frame < -1:
            return f"items[{i}].frame {item.frame}: the message has {num_frames} frame(s)"
        if problem := item_problem(i, item):
            return problem
    return None


@dataclass(slots=True)
class _Item:
    request_id: str
    hash: str
    data: bytes | None
    dest: Encode
    queued_at: float = 0.0  # time.perf_counter() when it joined the queue
    spec: MMItem | None = None  # the message's item: kind, a video's sampling, an audio clip's cut
    prepared: Any = None  # the family's encoder input, once made (kept when the budget defers it)

    @property
    def kind(self) -> str:
        return self.spec.kind if self.spec is not None else "image"


class EncodeWorker:
    def __init__(
        self,
        family: Any,
        io: Any,
        dataplane: Any,
        *,
        cache_bytes: int = 1 << 30,
        max_batch_items: int = 16,
        max_batch_tokens: int = 8192,
        local_prefill: Any = None,
        local_id: str = "",
        encoder_thread: Any = None,
    ) -> None:
        self.family = family
        self.io = io
        self.dataplane = dataplane
        self.cache: ByteLRU[torch.Tensor] = ByteLRU(cache_bytes)
        self.max_batch_items = max_batch_items
        self.max_batch_tokens = max_batch_tokens
        self.local_prefill = local_prefill
        self.local_id = local_id
        # services/encode/encoder_thread.py: the encoder call off the loop's thread (None: inline)
        self.encoder_thread = encoder_thread
        self._running: tuple[list[_Item], list[_Item], float] | None = None  # its batch, repeats, start
        self.queue: deque[_Item] = deque()
        self._offers: dict[tuple[str, str], torch.Tensor] = {}  # (hash, prefill address) -> features
        self._writes: list[Any] = []  # data plane handles in flight, with their sources
        self._dest_dataplane: dict[str, dict] = {}  # prefill id -> its data plane descriptor
        self.items_encoded = 0
        self.refusals = Refusals(log)
        self.phases = PhaseHistograms()  # encode_queue, encode (common/stage_histograms.py)
        self.cache_counts = CacheCounts()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def has_work(self) -> bool:
        """Something for `run_batch` now: a call to start, or a finished one on the encoder thread to
        collect (one still running is not work: the loop sleeps until it wakes the loop)."""
        if self._running is not None:
            return self.encoder_thread.done()
        return bool(self.queue)

    def request_ids(self) -> set[str]:
        running = self._running[0] + self._running[1] if self._running is not None else []
        return {item.request_id for item in (*self.queue, *running)}

    def idle(self) -> bool:
        """Nothing queued, encoding, offered or being written: the worker can go (a role change)."""
        return not self.queue and self._running is None and not self._offers and not self._writes

    # ---- messages ----------------------------------------------------------------------------------

    def on_encode(self, msg: Encode, frames: list[Any]) -> None:
        if problem := encode_problem(msg, len(frames)):
            self.refusals.count(msg, problem)
            self._fail(msg.request_id, problem, 400)
            return
        for item in msg.items:
            features = self.cache.get(item.hash)
            self.cache_counts.record(item.kind, hit=features is not None)
            if features is not None:
                self._deliver(item.hash, features, msg)
                continue
            if not 0 <= item.frame < len(frames):
                self._fail(msg.request_id, f"image {item.hash} was not sent and is not cached", 400)
                return
            data = bytes(frames[item.frame].buffer)
            self.queue.append(
                _Item(
                    msg.request_id,
                    item.hash,
                    data,
                    msg,
                    queued_at=time.perf_counter(),
                    spec=item,
                )  # fmt: skip
            )

    def on_feature_dest(self, msg: FeatureDest) -> None:
        features = self._offers.pop((msg.hash, msg.sender), None)
        if features is None or not msg.buffer_id:
            return  # the prefill instance holds these features already
        problem = id_problem("buffer_id", msg.buffer_id) or id_problem("transfer_id", msg.transfer_id)
        if problem is None and msg.offset < 0:
            problem = f"offset {msg.offset} is negative"
        if problem:
            self.refusals.count(msg, problem)  # nothing is written; the request times out at prefill
            return
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
        """Encode queued items in one encoder call: in queue order, as many as `max_batch_tokens` of
        encoder output and `max_batch_items` allow (the first one always). An item that does not fit
        goes back to the head of the queue, prepared, for the next call. With an encoder thread the
        call starts there and a later `run_batch` collects it; one call runs at a time."""
        if self._running is not None:
            if not self.encoder_thread.done():
                return
            (ready, repeats, began), self._running = self._running, None
            self._finish(ready, repeats, began, self.encoder_thread.result)
            return
        began = time.perf_counter()
        ready, prepared, repeats = self._take_batch(began)
        if ready and self.encoder_thread is not None and self.encoder_thread.offloads():
            self.encoder_thread.submit(prepared)
            self._running = (ready, repeats, began)
            return
        self._finish(ready, repeats, began, lambda: self.family.encode(prepared) if ready else [])

    def _finish(self, ready: list[_Item], repeats: list[_Item], began: float, encoded_of) -> None:
        """Cache and deliver a batch's features (`encoded_of()` gives them, or raises what the encoder
        raised), then serve the repeats of its items."""
        if ready:
            try:
                encoded = encoded_of()
            except Exception as exc:  # one bad batch fails its requests, not the process
                log.exception("an encoder batch failed", items=len(ready))
                for item in ready:
                    self._fail(item.request_id, f"internal error in the encoder: {exc}", 500)
                encoded, ready = [], []
            if ready:  # once per batch: decoding, preprocessing, the encoder call (no device sync)
                self.phases.observe("encode", time.perf_counter() - began)
            for item, features in zip(ready, encoded, strict=True):
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

    def _take_batch(self, began: float) -> tuple[list[_Item], list[Any], list[_Item]]:
        """(items to encode, their encoder inputs, repeats of those items' content to serve after)."""
        ready: list[_Item] = []
        prepared: list[Any] = []
        repeats: list[_Item] = []  # the same content twice among the queued items: encode it once
        seen: set[str] = set()
        tokens = 0
        while self.queue and len(ready) < self.max_batch_items:
            item = self.queue.popleft()
            cached = self.cache.get(item.hash)
            if cached is not None:
                self.phases.observe("encode_queue", began - item.queued_at)
                self._deliver(item.hash, cached, item.dest)
                continue
            if item.hash in seen:
                repeats.append(item)
                continue
            if item.prepared is None:
                try:
                    spec = item.spec or MMItem(hash=item.hash)
                    item.prepared = prepare_item(self.family, spec, item.data or b"")
                except (MediaError, ValueError) as exc:
                    self._fail(item.request_id, f"{item.kind} could not be processed: {exc}", 400)
                    continue
            cost = self.family.num_image_tokens(item.prepared)
            if ready and tokens + cost > self.max_batch_tokens:
                self.queue.appendleft(item)  # the next call starts with it
                break
            self.phases.observe("encode_queue", began - item.queued_at)
            tokens += cost
            seen.add(item.hash)
            ready.append(item)
            prepared.append(item.prepared)
        return ready, prepared, repeats

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
