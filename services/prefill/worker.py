"""The Prefill role: wait for features, run prompts in token-budgeted batches, hand KV to decode.

Life of a request here (queues, in order):
  waiting   PREFILL arrived; some of its features have not (deadline: the request's `deadline_s`)
  engine    admitted; the engine computes the prompt in chunks, batched with other prompts
  hand-off  first token sampled; KV layers stream to the decode instance (kv_sender), then KV_READY
When this process decodes too (co-located P+D, or monolithic), the engine simply goes on decoding
the request and its tokens go to the gateway from here: the KV never moves.

Every PREFILL, FEATURE_OFFER and KV_DEST is checked before use (validation.py): a bad one fails its
request (400) and is counted in `refusals`. A step that raises anyway fails the requests of that step
(500) and the engine goes on with the others.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from common.log import get_logger
from common.protocol import FeatureOffer, FirstToken, KvDest, Prefill, RequestError, Tokens, TokenUpdate
from common.stage_histograms import PhaseHistograms
from services.engine.engine import StepError
from services.engine.sequence import FinishReason
from services.phase_watch import ScheduleWatch
from services.prefill.features import ARENA_ID, FeatureStore
from services.prefill.kv_sender import KVSender
from services.prefill.validation import (
    PrefillLimits,
    feature_offer_problem,
    features_problem,
    grid_tokens,
    kv_dest_problem,
    prefill_problem,
)  # fmt: skip
from services.wire_checks import Refusals

log = get_logger("epd.prefill")
MAX_EARLY_DESTS = 1024  # KV_DESTs held for a PREFILL not here yet; the oldest go first


@dataclass(slots=True)
class _Waiting:
    msg: Prefill
    deadline: float
    arrived: float = 0.0  # time.perf_counter()


@dataclass(slots=True)
class _Admitted:
    prompt: list[int]
    rope_delta: int
    first_sent: bool = False
    started: float = 0.0  # time.perf_counter() when the step that ran its first chunk began


@dataclass(slots=True)
class _Route:
    """Where a request's KV goes: only its decode instance may name the blocks, once."""

    decode_id: str
    num_prompt_tokens: int
    has_dest: bool = False


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
        feature_buffer_id: str = ARENA_ID,
    ) -> None:
        self.family = family
        self.engine = engine
        self.io = io
        self.decodes = decodes  # this process hosts Decode too: requests never leave the engine
        self.features = FeatureStore(
            io, dataplane, cache_bytes, device=engine.kv.device, arena_id=feature_buffer_id
        )
        self.kv_sender = None if decodes else KVSender(engine, io, dataplane, stream_kv_layers)
        self.limits = PrefillLimits.of(family, engine, dataplane, cache_bytes)
        self.refusals = Refusals(log)
        self.waiting: dict[str, _Waiting] = {}
        self.admitted: dict[str, _Admitted] = {}
        self.routes: dict[str, _Route] = {}  # requests whose KV leaves for a decode instance
        self._early: OrderedDict[str, KvDest] = OrderedDict()
        # feature_wait, prefill_queue, prefill, decode_step (common/stage_histograms.py)
        self.phases = PhaseHistograms()
        self.unscheduled = ScheduleWatch(engine.scheduler, self.phases, "prefill_queue")

    def add_features(self, hash_: str, features: Any) -> None:
        """From an encoder in this same process."""
        self.features.add(hash_, features)
        self._admit_ready()

    def request_ids(self) -> set[str]:
        """Every request this worker holds, wherever it is."""
        return {*self.waiting, *self.admitted, *self.routes, *self.engine.scheduler.requests}

    def holds(self, rid: str) -> bool:
        return any(
            rid in d for d in (self.waiting, self.admitted, self.routes, self.engine.scheduler.requests)
        )

    # ---- messages ----------------------------------------------------------------------------------

    def on_prefill(self, msg: Prefill) -> None:
        rid = msg.request_id
        if self.holds(rid):  # failing it would fail the live request of that id
            self.refusals.count(msg, f"request_id {rid!r} is already being served here")
            return
        if problem := prefill_problem(msg, self.limits, decodes=self.decodes):
            self.refusals.count(msg, problem)
            self.io.to_gateway(RequestError(request_id=rid, message=problem, status=400))
            return
        self.waiting[rid] = _Waiting(msg, time.monotonic() + msg.deadline_s, time.perf_counter())
        for ref in msg.mm:
            self.features.cache.pin(ref.hash)
        if self.kv_sender is not None:
            self.routes[rid] = _Route(msg.decode_id, len(msg.token_ids))
            self.kv_sender.start(rid, msg.decode_address, msg.deadline_s)
            early = self._early.pop(rid, None)
            if early is not None:
                self.on_kv_dest(early)
        self._admit_ready()

    def on_feature_offer(self, msg: FeatureOffer) -> None:
        if problem := feature_offer_problem(msg, self.limits, self.features.incoming_bytes):
            self.refusals.count(msg, problem)  # no request to fail: offers come before requests
            return
        self.features.on_offer(msg)

    def on_kv_dest(self, msg: KvDest) -> None:
        rid = msg.request_id
        if self.kv_sender is None:
            self.refusals.count(msg, "this instance decodes its requests itself")
            return
        route = self.routes.get(rid)
        if route is None:  # usually its PREFILL is on the way (decode reserves at once); checked then
            if problem := kv_dest_problem(msg, self.limits.kv):
                self.refusals.count(msg, problem)
                return
            self._early[rid] = msg
            while len(self._early) > MAX_EARLY_DESTS:
                self._early.popitem(last=False)
            return
        if route.has_dest or msg.sender != route.decode_id:  # nobody else may redirect the KV
            self.refusals.count(msg, f"not the one destination from decode instance {route.decode_id!r}")
            return
        if problem := kv_dest_problem(msg, self.limits.kv, route.num_prompt_tokens):
            self.refusals.count(msg, problem)
            self._fail(rid, problem, 400)
            return
        route.has_dest = True
        self.kv_sender.on_kv_dest(msg)

    def on_abort(self, request_id: str) -> None:
        w = self.waiting.pop(request_id, None)
        if w is not None:
            self._unpin(w.msg)
        if self.kv_sender is not None:
            self.kv_sender.drop(request_id)
        self.routes.pop(request_id, None)
        self._early.pop(request_id, None)
        self.engine.abort(request_id)
        self.admitted.pop(request_id, None)
        self.unscheduled.drop(request_id)

    # ---- progress ----------------------------------------------------------------------------------

    def poll(self) -> None:
        if self.features.poll():
            self._admit_ready()
        now = time.monotonic()
        for rid, w in list(self.waiting.items()):
            if now > w.deadline:
                missing = sum(not self.features.has(r.hash) for r in w.msg.mm)
                self._fail(rid, f"timed out waiting for the features of {missing} image(s) or video(s)", 504)
        if self.kv_sender is not None:
            for rid, error in self.kv_sender.poll():
                self._fail(rid, error, 502)
            for rid in [r for r in self.routes if r not in self.kv_sender.handoffs]:  # handed over
                del self.routes[rid]

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        updates = []
        began = time.perf_counter()
        outputs = self._engine_step()
        ended = time.perf_counter()  # the first tokens are on the host: no sync to add
        for rid in self.unscheduled.scheduled(began):
            if (req := self.admitted.get(rid)) is not None:
                req.started = began
        for out in outputs:
            rid = out.request_id
            req = self.admitted.get(rid)
            if req is None:
                continue
            if not out.new_token_ids:  # the engine gave it up: no token to report
                self._fail(rid, self._gave_up(out.finish_reason), 503)
                continue
            if req.first_sent:
                updates.append(
                    TokenUpdate(
                        request_id=rid, token_ids=out.new_token_ids,
                        finished=out.finished, finish_reason=out.finish_reason, logprobs=out.logprobs,
                        position=out.position,
                    )
                )  # fmt: skip
            else:
                req.first_sent = True
                self.phases.observe("prefill", ended - (req.started or began))
                self._first_token(rid, req, out)
            if out.finished or self.kv_sender is not None:
                del self.admitted[rid]
        if updates:  # this step decoded (a mixed step with prompt chunks counts too)
            self.phases.observe("decode_step", ended - began)
            self.io.to_gateway(Tokens(updates=updates))
        if self.kv_sender is not None:
            self.kv_sender.flush()

    # ---- helpers -----------------------------------------------------------------------------------

    def _engine_step(self) -> list[Any]:
        """One engine step; when it raises, its requests fail (the engine freed their blocks) and the
        requests the scheduler gave up before the failure still come out."""
        hook = self.kv_sender.on_layer if self.kv_sender is not None else None
        try:
            return self.engine.step(layer_hook=hook)
        except StepError as exc:
            log.error("a prefill step failed", error=str(exc), requests=len(exc.request_ids))
            for rid in exc.request_ids:
                self._fail(rid, f"internal error in the prefill step: {exc}", 500)
            return exc.failed

    def _gave_up(self, reason: str | None) -> str:
        where = "prefill/decode" if self.decodes else "prefill"
        if reason == FinishReason.ERROR.value:
            return f"the {where} instance ran out of KV memory"
        return f"the {where} instance ended the request without a token ({reason})"

    def _first_token(self, rid: str, req: _Admitted, out: Any) -> None:
        first = FirstToken(
            request_id=rid, token_id=out.new_token_ids[0], num_prompt_tokens=len(req.prompt),
            finished=out.finished, finish_reason=out.finish_reason, logprobs=out.logprobs,
            num_cached_tokens=out.num_cached_tokens,
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
            if msg.mm:
                self.phases.observe("feature_wait", time.perf_counter() - w.arrived)
            try:
                self._admit(msg, feats)
            except ValueError as exc:
                self._fail(rid, str(exc), 400)
            except Exception as exc:  # a bug, not the request's fault: fail it, keep serving
                log.exception("admitting a prompt failed", request_id=rid)
                self._fail(rid, f"internal error admitting the prompt: {exc}", 500)
            finally:
                self._unpin(msg)

    def _admit(self, msg: Prefill, feats: list[Any]) -> None:
        for i, (ref, f) in enumerate(zip(msg.mm, feats, strict=True)):
            if problem := features_problem(i, ref, f, self.limits.merge_size):
                raise ValueError(problem)
        inputs = self.family.model_inputs(
            msg.token_ids, [tuple(r.grid_thw) for r in msg.mm], feats,
            [r.kind for r in msg.mm], [r.second_per_grid_t for r in msg.mm],
        )  # fmt: skip
        # placeholder counts from the grids, which the validation checked against the prompt
        items = [(r.hash, grid_tokens(tuple(r.grid_thw), self.family.merge_size)) for r in msg.mm]
        self.engine.add_request(msg.request_id, msg.token_ids, msg.params, inputs, items)
        self.admitted[msg.request_id] = _Admitted(msg.token_ids, inputs.rope_delta)
        self.unscheduled.queued(msg.request_id)
        log.info(
            "prefill admitted",
            request_id=msg.request_id,
            prompt_tokens=len(msg.token_ids),
            images=len(msg.mm),
        )

    def _unpin(self, msg: Prefill) -> None:
        for ref in msg.mm:
            self.features.cache.unpin(ref.hash)

    def _fail(self, rid: str, message: str, status: int) -> None:
        log.warning("request failed", request_id=rid, error=message)
        self.on_abort(rid)
        self.io.to_gateway(RequestError(request_id=rid, message=message, status=status))
