"""The Decode role: reserve blocks, receive KV into them, decode in one continuous batch.

Life of a request here (queues, in order):
  backlog    KV_RESERVE arrived but the pool has no room yet (retried every loop, with a deadline)
  receiving  blocks reserved, KV_DEST sent to the prefill instance; the data plane writes the prompt's
             KV where the landing says (kv_landing.py): straight into those pool blocks, or into a host
             staging area copied into them on arrival (a device pool)
  engine     KV_READY came and every byte is in: the request joins the running batch
  handoff    HANDOFF from the gateway (a drain, a role change): out of the batch between steps, its KV
             sent to another decode instance, which goes on from its last token (handoff.py)
Every decode step sends the new tokens of all requests in one TOKENS message. Abort, a failed
transfer or a deadline frees the blocks wherever the request is, fence first: while bytes of an
aborted transfer may still land (the data plane's `abort_fence_s`: a producer finishing the chunk it
had started), its blocks stay out of everyone's reach, and only then are they freed.

What arrives is checked before use (validation.py), and refusals are counted in `refusals`:
  KV_RESERVE  a request id already here is refused (failing it would fail the live request); a prompt
              that does not fit the context fails its request (400); blocks claimed by reservations
              not yet arrived are capped (reservations.py: by default 3/4 of the pool in total and 1/2
              per peer, each at least one whole context), past which it fails at once (503, "decode
              instance has too many reservations in flight") instead of waiting; a reservation whose
              KV does not come is released at its deadline (`timeout_s`, 30 s by default)
  KV_READY    only from the prefill instance the reservation names, once; token ids within the
              vocabulary and a length that matches the reservation, or its request fails (400)
A request the engine gives up (preempted with no swap space left, and a decode stage cannot
recompute a prompt it never had) fails with a 503: the decode instance ran out of KV memory. A step
that raises fails the requests of that step (500); the others go on.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from common.dataplane.base import Region, TransferState
from common.log import get_logger
from common.protocol import Handoff, KvDest, KvReady, KvReserve, RequestError, Tokens, TokenUpdate
from common.stage_histograms import PhaseHistograms
from services.decode.handoff import DecodeHandoffs
from services.decode.kv_landing import InPlaceLanding
from services.decode.reservations import ReservationLedger, ReservationLimits
from services.decode.validation import kv_ready_problem, kv_reserve_problem
from services.engine.engine import StepError
from services.engine.kv_cache import block_offset
from services.engine.sequence import FinishReason
from services.phase_watch import ScheduleWatch
from services.wire_checks import Refusals, vocab_size

log = get_logger("epd.decode")
OUT_OF_KV = "the decode instance ran out of KV memory"


@dataclass(slots=True)
class _Receiving:
    msg: KvReserve
    handle: Any
    deadline: float
    pool_blocks: list[int]
    ready: KvReady | None = None


class DecodeWorker:
    def __init__(
        self,
        engine: Any,
        io: Any,
        dataplane: Any,
        *,
        landing: Any = None,
        timeout_s: float = 30.0,
        limits: ReservationLimits | None = None,
        buffer_id: str = "kv",
    ) -> None:
        """`buffer_id`: the data-plane buffer KV lands in (the pool, or its staging area)."""
        self.engine = engine
        self.io = io
        self.dataplane = dataplane
        self.timeout_s = timeout_s
        self.landing = landing or InPlaceLanding(engine.kv)
        self.block_bytes = engine.kv.block_bytes
        self.limits = limits or ReservationLimits.for_engine(engine)
        self.claims = ReservationLedger()  # blocks of the backlog and of `receiving`, per peer
        self.refusals = Refusals(log)
        self.vocab = vocab_size(engine.family)
        self.backlog: dict[str, tuple[KvReserve, float]] = {}
        self.receiving: dict[str, _Receiving] = {}
        self.fencing: dict[str, float] = {}  # aborted mid-transfer: freed when the fence time passes
        self.phases = PhaseHistograms()  # kv_transfer, decode_queue, decode_step (stage_histograms)
        self.unscheduled = ScheduleWatch(engine.scheduler, self.phases, "decode_queue")
        self.buffer_id = buffer_id
        self.handoffs = DecodeHandoffs(engine, io, dataplane, self.refusals, timeout_s)

    def request_ids(self) -> set[str]:
        """Every request this worker holds (fenced ones are gone already, only their blocks wait)."""
        return (self._decoding() | self.handoffs.request_ids()) - self.fencing.keys()

    def _decoding(self) -> set[str]:
        """The requests reserved, arriving or in the engine: what a hand-off can still take."""
        return {*self.backlog, *self.receiving, *self.engine.scheduler.requests}

    def idle(self) -> bool:
        """No request held and no aborted transfer that may still land: the pool can go."""
        return not self.request_ids() and not self.fencing

    # ---- messages ----------------------------------------------------------------------------------

    def on_kv_reserve(self, msg: KvReserve, peer: Any = None) -> None:
        """`peer`: the connection it came on (the caps are per peer); None: its sender field."""
        rid = msg.request_id
        if any(
            rid in d for d in (self.backlog, self.receiving, self.fencing, self.engine.scheduler.requests)
        ):
            self.refusals.count(msg, f"request_id {rid!r} is already reserved here")
            return
        if problem := kv_reserve_problem(msg, self.engine.max_model_len):
            self._refuse(msg, problem, 400)
            return
        blocks = self.engine.block_manager.blocks_for(msg.num_prompt_tokens)
        peer = msg.sender if peer is None else peer
        if problem := self.limits.refusal(self.claims, peer, blocks):
            self._refuse(msg, problem, 503)
            return
        self.claims.add(rid, peer, blocks)
        self.backlog[rid] = (msg, time.monotonic() + self.timeout_s)
        self._reserve_backlog()

    def on_kv_ready(self, msg: KvReady) -> None:
        rid = msg.request_id
        r = self.receiving.get(rid)
        if r is None or r.ready is not None or msg.sender != r.msg.prefill_id:
            self.refusals.count(msg, "no reservation here awaits this KV_READY from its sender")
            return
        if problem := kv_ready_problem(msg, r.msg, self.vocab, self.engine.max_model_len):
            self.refusals.count(msg, problem)
            self._fail(rid, problem, 400)
            return
        r.ready = msg
        self._admit(rid, r)

    def on_handoff(self, msg: Handoff) -> None:
        """Move a request to another decode instance (services/decode/handoff.py)."""
        self.handoffs.on_handoff(msg)

    def on_kv_dest(self, msg: KvDest) -> None:
        """The target's blocks for a request this instance hands off."""
        self.handoffs.on_kv_dest(msg)

    def on_abort(self, request_id: str) -> None:
        self.handoffs.drop(request_id)
        if request_id in self.fencing:  # aborted already: its blocks wait for the fence, not for this
            return
        self.claims.remove(request_id)
        self.backlog.pop(request_id, None)
        r = self.receiving.pop(request_id, None)
        if r is not None:
            complete = r.handle.poll() is TransferState.SUCCESS
            r.handle.abort()
            if not complete and self.dataplane.abort_fence_s > 0:
                self.fencing[request_id] = time.monotonic() + self.dataplane.abort_fence_s
                return
            self.landing.release(request_id)
        self.engine.abort(request_id)
        self.unscheduled.drop(request_id)

    # ---- progress ----------------------------------------------------------------------------------

    def poll(self) -> None:
        now = time.monotonic()
        for rid, until in list(self.fencing.items()):
            if now >= until:  # no byte of the aborted transfer can land any more
                del self.fencing[rid]
                self.landing.release(rid)
                self.engine.abort(rid)
        self._reserve_backlog()
        for rid, r in list(self.receiving.items()):
            state = r.handle.poll()
            if state is TransferState.FAILED:
                self._fail(rid, f"KV transfer from prefill failed: {r.handle.failure()}")
            elif now > r.deadline:
                self._fail(rid, "KV from prefill did not arrive in time")
            else:
                self._admit(rid, r)
        for rid, (_, deadline) in list(self.backlog.items()):
            if now > deadline:
                self._fail(rid, "no KV blocks became free in time", 503)
        for rid, error in self.handoffs.poll(self._decoding()):
            self._fail(rid, error)

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        updates = []
        began = time.perf_counter()
        outputs = self._engine_step()
        ended = time.perf_counter()  # the tokens are on the host: no sync to add
        self.unscheduled.scheduled(began)
        for o in outputs:
            if o.finish_reason == FinishReason.ERROR.value:  # preempted and nothing to swap or recompute
                self._fail(o.request_id, OUT_OF_KV, 503)
                continue
            updates.append(
                TokenUpdate(
                    request_id=o.request_id, token_ids=o.new_token_ids,
                    finished=o.finished, finish_reason=o.finish_reason, logprobs=o.logprobs,
                    position=o.position,
                )
            )  # fmt: skip
        if updates:
            self.phases.observe("decode_step", ended - began)
            self.io.to_gateway(Tokens(updates=updates))
            for u in updates:
                if u.finished:
                    log.info("decode finished", request_id=u.request_id, reason=u.finish_reason)

    # ---- helpers -----------------------------------------------------------------------------------

    def _engine_step(self) -> list[Any]:
        """One engine step; when it raises, its requests fail (the engine freed their blocks) and the
        requests the scheduler gave up before the failure still come out."""
        try:
            return self.engine.step()
        except StepError as exc:
            log.error("a decode step failed", error=str(exc), requests=len(exc.request_ids))
            for rid in exc.request_ids:
                self._fail(rid, f"internal error in the decode step: {exc}", 500)
            return exc.failed

    def _reserve_backlog(self) -> None:
        for rid, (msg, deadline) in list(self.backlog.items()):
            try:
                blocks = self.engine.reserve(rid, msg.num_prompt_tokens, msg.params)
            except ValueError as exc:
                self._fail(rid, str(exc), 400)
                continue
            if blocks is None:
                return  # first come, first served: later ones wait behind
            landing = self.landing.reserve(rid, blocks)
            if landing is None:  # the staging area is full: wait, holding nothing
                self.engine.abort(rid)
                return
            del self.backlog[rid]
            transfer_id = uuid.uuid4().hex
            area, bb = self.landing.num_blocks, self.block_bytes
            regions = [
                Region(self.buffer_id, block_offset(layer, kind, b, area, bb), bb)
                for layer in range(self.engine.layout.num_layers)
                for kind in (0, 1)
                for b in landing
            ]
            handle = self.dataplane.expect(transfer_id, regions)
            handle.on_done(self.io.wake)
            self.receiving[rid] = _Receiving(msg, handle, deadline, blocks)
            dest = KvDest(
                request_id=rid, block_ids=landing, transfer_id=transfer_id, pool_blocks=area,
                block_bytes=bb, dataplane=self.dataplane.descriptor(), buffer_id=self.buffer_id,
            )  # fmt: skip
            self.io.send(msg.prefill_address, dest)

    def _admit(self, rid: str, r: _Receiving) -> None:
        if r.ready is not None and r.handle.poll() is TransferState.SUCCESS:
            del self.receiving[rid]
            self.claims.remove(rid)
            self.landing.land(rid, r.pool_blocks)
            self.engine.admit_reserved(rid, r.ready.token_ids, r.ready.rope_delta, r.ready.prompt_len)
            self.unscheduled.queued(rid)
            if (first := r.handle.first_byte_at) is not None:  # the data plane's clock: monotonic
                self.phases.observe("kv_transfer", time.monotonic() - first)
            log.info("decode admitted", request_id=rid, prompt_tokens=r.ready.num_prompt_tokens)

    def _refuse(self, msg: KvReserve, problem: str, status: int) -> None:
        """Fail a KV_RESERVE's request before it holds anything here."""
        self.refusals.count(msg, problem)
        self.io.to_gateway(RequestError(request_id=msg.request_id, message=problem, status=status))

    def _fail(self, rid: str, message: str, status: int = 502) -> None:
        log.warning("request failed", request_id=rid, error=message)
        self.on_abort(rid)
        self.io.to_gateway(RequestError(request_id=rid, message=message, status=status))
