"""The Prefill role: wait for features, run prompts in token-budgeted batches, hand KV to decode.

Life of a request here (queues, in order):
  waiting   PREFILL arrived; some of its features have not (deadline: the request's `deadline_s`)
  engine    admitted; the engine computes the prompt in chunks, batched with other prompts
  hand-off  first token sampled; KV layers stream to the decode instance (kv_sender), then KV_READY
When this process decodes too (co-located P+D, or monolithic), the engine simply goes on decoding
the request and its tokens go to the gateway from here: the KV never moves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from common.log import get_logger
from common.protocol import FirstToken, KvDest, Prefill, RequestError, Tokens, TokenUpdate
from services.prefill.features import FeatureStore
from services.prefill.kv_sender import KVSender

log = get_logger("epd.prefill")


@dataclass(slots=True)
class _Waiting:
    msg: Prefill
    deadline: float


@dataclass(slots=True)
class _Admitted:
    prompt: list[int]
    rope_delta: int
    first_sent: bool = False


class PrefillWorker:
    def __init__(
        self,
        family: Any,
        engine: Any,
        io: Any,
        dataplane: Any,
        *,
        decodes: bool,
        cache_bytes: int = 1 << 30,
        stream_kv_layers: bool = True,
    ) -> None:
        self.family = family
        self.engine = engine
        self.io = io
        self.decodes = decodes  # this process hosts Decode too: requests never leave the engine
        self.features = FeatureStore(io, dataplane, cache_bytes, device=engine.kv.device)
        self.kv_sender = None if decodes else KVSender(engine, io, dataplane, stream_kv_layers)
        self.waiting: dict[str, _Waiting] = {}
        self.admitted: dict[str, _Admitted] = {}

    def add_features(self, hash_: str, features: Any) -> None:
        """From an encoder in this same process."""
        self.features.add(hash_, features)
        self._admit_ready()

    # ---- messages ----------------------------------------------------------------------------------

    def on_prefill(self, msg: Prefill) -> None:
        self.waiting[msg.request_id] = _Waiting(msg, time.monotonic() + msg.deadline_s)
        for ref in msg.mm:
            self.features.cache.pin(ref.hash)
        if self.kv_sender is not None:
            self.kv_sender.start(msg.request_id, msg.decode_address, msg.deadline_s)
        self._admit_ready()

    def on_kv_dest(self, msg: KvDest) -> None:
        if self.kv_sender is not None:
            self.kv_sender.on_kv_dest(msg)

    def on_abort(self, request_id: str) -> None:
        w = self.waiting.pop(request_id, None)
        if w is not None:
            self._unpin(w.msg)
        if self.kv_sender is not None:
            self.kv_sender.drop(request_id)
        self.engine.abort(request_id)
        self.admitted.pop(request_id, None)

    # ---- progress ----------------------------------------------------------------------------------

    def poll(self) -> None:
        if self.features.poll():
            self._admit_ready()
        now = time.monotonic()
        for rid, w in list(self.waiting.items()):
            if now > w.deadline:
                missing = sum(not self.features.has(r.hash) for r in w.msg.mm)
                self._fail(rid, f"timed out waiting for the features of {missing} image(s)", 504)
        if self.kv_sender is not None:
            for rid, error in self.kv_sender.poll():
                self._fail(rid, error, 502)

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        updates = []
        hook = self.kv_sender.on_layer if self.kv_sender is not None else None
        for out in self.engine.step(layer_hook=hook):
            rid = out.request_id
            req = self.admitted.get(rid)
            if req is None:
                continue
            if req.first_sent:
                updates.append(
                    TokenUpdate(
                        request_id=rid, token_ids=out.new_token_ids,
                        finished=out.finished, finish_reason=out.finish_reason, logprobs=out.logprobs,
                    )
                )  # fmt: skip
            else:
                req.first_sent = True
                self._first_token(rid, req, out)
            if out.finished or self.kv_sender is not None:
                del self.admitted[rid]
        if updates:
            self.io.to_gateway(Tokens(updates=updates))
        if self.kv_sender is not None:
            self.kv_sender.flush()

    # ---- helpers -----------------------------------------------------------------------------------

    def _first_token(self, rid: str, req: _Admitted, out: Any) -> None:
        first = FirstToken(
            request_id=rid, token_id=out.new_token_ids[0], num_prompt_tokens=len(req.prompt),
            finished=out.finished, finish_reason=out.finish_reason, logprobs=out.logprobs,
        )  # fmt: skip
        self.io.to_gateway(first)
        if self.kv_sender is None:
            return
        if out.finished:
            self.kv_sender.drop(rid)
        else:
            tokens = req.prompt + out.new_token_ids
            self.kv_sender.prefilled(rid, tokens, len(req.prompt), req.rope_delta)

    def _admit_ready(self) -> None:
        for rid, w in list(self.waiting.items()):
            feats = [self.features.get(r.hash) for r in w.msg.mm]
            if any(f is None for f in feats):
                continue
            del self.waiting[rid]
            msg = w.msg
            try:
                inputs = self.family.model_inputs(msg.token_ids, [tuple(r.grid_thw) for r in msg.mm], feats)
                self.engine.add_request(rid, msg.token_ids, msg.params, inputs)
            except ValueError as exc:
                self._fail(rid, str(exc), 400)
                continue
            finally:
                self._unpin(msg)
            self.admitted[rid] = _Admitted(msg.token_ids, inputs.rope_delta)
            log.info("prefill admitted", request_id=rid, prompt_tokens=len(msg.token_ids), images=len(msg.mm))

    def _unpin(self, msg: Prefill) -> None:
        for ref in msg.mm:
            self.features.cache.unpin(ref.hash)

    def _fail(self, rid: str, message: str, status: int) -> None:
        log.warning("request failed", request_id=rid, error=message)
        self.on_abort(rid)
        self.io.to_gateway(RequestError(request_id=rid, message=message, status=status))
