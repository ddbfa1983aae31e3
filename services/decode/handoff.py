"""Move a decoding request, with its KV, to another decode instance (a drain, a role change).

The gateway sends HANDOFF(request, target). Between two steps the request leaves the batch with its
blocks kept (`Engine.detach`), and from then on this instance is the request's prefill toward the
target, in the messages a prefill hand-off uses:

  this -> target   KV_RESERVE   tokens whose KV is here: every token but the last one sampled
  target -> this   KV_DEST      the blocks it reserved
  this => target   every layer of those blocks over the data plane (services/prefill/kv_sender.py)
  this -> target   KV_READY     every token so far and the request's own prompt length, so the
                                target counts max_tokens and seeded sampling's token index on from
                                where this instance stopped

and the blocks here are freed once the write is complete. Every token sampled here reached the
gateway in the message of the step that sampled it, before the request left the batch, so the
target's tokens follow them in order. A request whose KV is still arriving here, or that is swapped
out to host memory, moves once it is back in the batch; one that ends first is simply forgotten. A
hand-off that fails (the target refuses or dies, the transfer fails) fails its request.
"""

from __future__ import annotations

import time
from typing import Any

from common.protocol import Handoff, KvDest, KvReady, KvReserve
from services.prefill.kv_sender import KVSender
from services.prefill.validation import KvGeometry, kv_dest_problem
from services.wire_checks import Refusals, ids_problem


class DecodeHandoffs:
    def __init__(self, engine: Any, io: Any, dataplane: Any, refusals: Refusals, timeout_s: float = 30.0):
        self.engine = engine
        self.io = io
        self.refusals = refusals
        self.timeout_s = timeout_s
        # after the step, all layers at once: nothing computes these blocks any more
        self.sender = KVSender(engine, io, dataplane, stream_layers=False)
        self.waiting: dict[str, tuple[Handoff, float]] = {}  # asked for, not yet out of the batch
        self.moving: dict[str, tuple[str, int]] = {}  # out of the batch: (target id, tokens whose KV moves)
        self.moved = 0  # hand-offs completed since start
        self._dest_geometry = KvGeometry.of(engine, dataplane)

    def request_ids(self) -> set[str]:
        return {*self.waiting, *self.moving}

    def on_handoff(self, msg: Handoff) -> None:
        if problem := ids_problem(msg, "request_id", "decode_id", "decode_address"):
            self.refusals.count(msg, problem)
            return
        if msg.decode_id == self.io.name:
            self.refusals.count(msg, "a hand-off to this instance itself")
            return
        if msg.request_id not in self.moving:
            self.waiting[msg.request_id] = (msg, time.monotonic() + self.timeout_s)

    def on_kv_dest(self, msg: KvDest) -> None:
        target = self.moving.get(msg.request_id)
        if target is None or msg.sender != target[0]:
            self.refusals.count(msg, "no hand-off here awaits this KV_DEST from its sender")
            return
        if problem := kv_dest_problem(msg, self._dest_geometry, target[1]):
            self.refusals.count(msg, problem)
            return  # the hand-off times out and fails its request
        self.sender.on_kv_dest(msg)

    def poll(self, held: set[str]) -> list[tuple[str, str]]:
        """Start the hand-offs whose request is between steps now; finish the written ones. `held`:
        the requests the decode worker holds apart from its hand-offs (a waiting hand-off of any
        other one is forgotten: it finished or failed here before it could move).
        Returns (request id, error) of the hand-offs that failed (their blocks are freed)."""
        now = time.monotonic()
        for rid, (msg, deadline) in list(self.waiting.items()):
            seq = self.engine.detach(rid)
            if seq is not None:
                del self.waiting[rid]
                self._start(msg, seq)
            elif rid not in held or now > deadline:  # ended here; or never back in the batch
                del self.waiting[rid]
        failed = self.sender.poll()
        done = [rid for rid in self.moving if rid not in self.sender.handoffs]
        for rid in done:
            del self.moving[rid]
        self.moved += len(done) - len(failed)
        return failed

    def drop(self, request_id: str) -> None:
        """Abort: stop waiting or sending; the engine frees the blocks."""
        self.waiting.pop(request_id, None)
        if self.moving.pop(request_id, None) is not None:
            self.sender.drop(request_id)

    def _start(self, msg: Handoff, seq: Any) -> None:
        rid, kv_tokens = msg.request_id, seq.num_computed_tokens
        inputs = seq.model_inputs
        self.sender.start(rid, msg.decode_address, self.timeout_s)
        h = self.sender.handoffs[rid]
        h.seq, h.kv_tokens = seq, kv_tokens
        h.pending_layers = list(range(self.sender.num_layers))  # they go when KV_DEST comes
        h.ready = KvReady(
            request_id=rid, token_ids=list(seq.token_ids), num_prompt_tokens=kv_tokens,
            rope_delta=inputs.rope_delta if inputs is not None else 0, prompt_len=seq.num_prompt_tokens,
        )  # fmt: skip
        self.moving[rid] = (msg.decode_id, kv_tokens)
        reserve = KvReserve(
            request_id=rid, num_prompt_tokens=kv_tokens, params=seq.params, prefill_id=self.io.name,
            prefill_address=self.io.address,
        )  # fmt: skip
        self.io.send(msg.decode_address, reserve)
