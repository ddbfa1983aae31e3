"""Ship a prompt's KV from a prefill instance into the blocks a decode instance reserved for it.

Layer by layer: the prefill worker hands `on_layer` to each engine step, which calls it as soon as a
layer's keys and values for the step are in the pool, and the blocks of every prompt that completes in
this step go out on the data plane's own thread while the next layer computes (on CPU hosts, where a
copy competes with the prompt for cores, the layers wait for the end of the step and go out right after
the first token). If the decode instance's destination (KV_DEST) has not arrived yet, layers wait in a
list and go when it does. When every layer has arrived on the other side and the first token is known,
decode gets KV_READY and the blocks here are freed.

A pool in device memory goes straight to the decode instance's device pool when the data plane moves
device memory (cudaipc, torchdist on a GPU), layer by layer during the step. Otherwise it goes out
through pinned host copies of its blocks (host staging), after the step, when the first token has
been sampled and the device is idle anyway; the decode side lands them in its own staging area
(services/decode/kv_landing.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from common.dataplane.base import Region, TransferState
from common.protocol import KvDest, KvReady
from services.engine.kv_cache import block_offset
from services.engine.scheduler import ScheduledChunk
from services.engine.sequence import Sequence
from services.tensor_bytes import byte_view


@dataclass(slots=True)
class Handoff:
    request_id: str
    decode_address: str
    deadline: float
    dest: KvDest | None = None
    seq: Sequence | None = None
    pending_layers: list[int] = field(default_factory=list)
    sent_layers: int = 0
    handles: list[Any] = field(default_factory=list)
    ready: KvReady | None = None  # set once the first token is sampled
    staged: list[Any] = field(default_factory=list)  # host copies of device blocks, alive until sent
    kv_tokens: int = 0  # tokens whose KV moves; 0: the prompt's (a decode hand-off moves more)


class KVSender:
    def __init__(self, engine: Any, io: Any, dataplane: Any, stream_layers: bool = True) -> None:
        self.engine = engine
        # stream each layer while the next computes (accelerators: copy engines run beside compute),
        # or hold the layers until the step is done (CPU: a copy takes a core from the prompt)
        self.stream_layers = stream_layers
        self.io = io
        self.dataplane = dataplane
        self.num_layers = engine.layout.num_layers
        self.handoffs: dict[str, Handoff] = {}
        self._early: dict[str, KvDest] = {}  # destinations that came before their request

    def start(self, request_id: str, decode_address: str, timeout_s: float) -> None:
        h = Handoff(request_id, decode_address, time.monotonic() + timeout_s)
        h.dest = self._early.pop(request_id, None)
        self.handoffs[request_id] = h

    def on_kv_dest(self, msg: KvDest) -> None:
        h = self.handoffs.get(msg.request_id)
        if h is None:
            self._early[msg.request_id] = msg
            return
        h.dest = msg
        for layer in h.pending_layers:
            self._send_layer(h, layer)
        h.pending_layers.clear()

    def on_layer(self, layer: int, chunks: list[ScheduledChunk]) -> None:
        for c in chunks:
            h = self.handoffs.get(c.seq.request_id)
            if h is None:
                continue
            h.seq = c.seq
            if h.dest is None or not self.stream_layers:
                h.pending_layers.append(layer)
            else:
                self._send_layer(h, layer)

    def flush(self) -> None:
        """Send the layers held back during the step (when not streaming them)."""
        for h in self.handoffs.values():
            if h.pending_layers and h.dest is not None and h.seq is not None:
                for layer in h.pending_layers:
                    self._send_layer(h, layer)
                h.pending_layers.clear()

    def prefilled(self, request_id: str, token_ids: list[int], num_prompt: int, rope_delta: int) -> None:
        h = self.handoffs.get(request_id)
        if h is not None:
            h.ready = KvReady(
                request_id=request_id,
                token_ids=token_ids,
                num_prompt_tokens=num_prompt,
                rope_delta=rope_delta,
            )

    def drop(self, request_id: str) -> None:
        """Abort: stop sending; the engine frees the blocks."""
        h = self.handoffs.pop(request_id, None)
        self._early.pop(request_id, None)
        if h is not None:
            for handle in h.handles:
                handle.abort()

    def poll(self) -> list[tuple[str, str]]:
        """Finish complete hand-offs; returns (request id, error) of those that failed."""
        failed = []
        now = time.monotonic()
        for rid, h in list(self.handoffs.items()):
            states = [handle.poll() for handle in h.handles]
            if TransferState.FAILED in states:
                reason = next(x.failure() for x in h.handles if x.poll() is TransferState.FAILED)
                failed.append((rid, f"KV transfer to decode failed: {reason}"))
            elif now > h.deadline:
                failed.append((rid, "KV transfer to decode timed out (no destination or no completion)"))
            elif (
                h.ready is not None
                and h.sent_layers == self.num_layers
                and all(s is TransferState.SUCCESS for s in states)
            ):
                self.io.send(h.decode_address, h.ready)
                del self.handoffs[rid]
                self.engine.release_prefilled(rid)
        for rid, _ in failed:
            self.drop(rid)
            self.engine.abort(rid)
        return failed

    def _send_layer(self, h: Handoff, layer: int) -> None:
        assert h.dest is not None and h.seq is not None
        dest = h.dest
        pool = self.engine.kv.pool  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        n_blocks = self.engine.block_manager.blocks_for(h.kv_tokens or h.seq.num_prompt_tokens)
        items = []
        for kind in (0, 1):
            for src, dst, count in _runs(h.seq.block_table[:n_blocks], dest.block_ids):
                offset = block_offset(layer, kind, dst, dest.pool_blocks, dest.block_bytes)
                region = Region(dest.buffer_id, offset, count * dest.block_bytes)
                items.append((self._source(h, pool[layer, kind, src : src + count]), region))
        handle = self.dataplane.write(dest.dataplane, dest.transfer_id, items)
        handle.on_done(self.io.wake)
        h.handles.append(handle)
        h.sent_layers += 1

    def _source(self, h: Handoff, blocks: torch.Tensor) -> Any:
        """The blocks as memory the data plane can read: the pool itself on a CPU host, or on a device
        the plane moves (cudaipc, torchdist: the copy waits for this layer's kernels on a side stream);
        else a pinned host copy (staging), kept with the hand-off until its writes are final."""
        if blocks.device.type == "cpu":
            return byte_view(blocks)
        if blocks.device.type in self.dataplane.devices:
            return blocks
        staged = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=blocks.device.type == "cuda")
        staged.copy_(blocks)
        h.staged.append(staged)
        return staged


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src, dst, count) runs of blocks consecutive on both sides: one copy and one region each,
    instead of one per block (blocks handed out in order usually make a request's KV one run)."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
