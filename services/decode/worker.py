"""The Decode role: reserve blocks, receive KV into them, decode in one continuous batch.

Life of a request here (queues, in order):
  backlog    KV_RESERVE arrived but the pool has no room yet (retried every loop, with a deadline)
  receiving  blocks reserved, KV_DEST sent to the prefill instance; the data plane writes the prompt's
             KV where the landing says (kv_landing.py): straight into those pool blocks, or into a host
             staging area copied into them on arrival (a device pool)
  engine     KV_READY came and every byte is in: the request joins the running batch
Every decode step sends the new tokens of all requests in one TOKENS message. Abort, a failed
transfer or a deadline frees the blocks wherever the request is, fence first: while bytes of an
aborted transfer may still land (the data plane's `abort_fence_s`: a producer finishing the chunk it
had started), its blocks stay out of everyone's reach, and only then are they freed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from common.dataplane.base import Region, TransferState
from common.log import get_logger
from common.protocol import KvDest, KvReady, KvReserve, RequestError, Tokens, TokenUpdate
from services.decode.kv_landing import InPlaceLanding
from services.engine.kv_cache import block_offset

log = get_logger("epd.decode")


@dataclass(slots=True)
class _Receiving:
    msg: KvReserve
    handle: Any
    deadline: float
    pool_blocks: list[int]
    ready: KvReady | None = None


class DecodeWorker:
    def __init__(
        self, engine: Any, io: Any, dataplane: Any, *, landing: Any = None, timeout_s: float = 30.0
    ) -> None:
        self.engine = engine
        self.io = io
        self.dataplane = dataplane
        self.timeout_s = timeout_s
        self.landing = landing or InPlaceLanding(engine.kv)
        self.block_bytes = engine.kv.block_bytes
        self.backlog: dict[str, tuple[KvReserve, float]] = {}
        self.receiving: dict[str, _Receiving] = {}
        self.fencing: dict[str, float] = {}  # aborted mid-transfer: freed when the fence time passes

    # ---- messages ----------------------------------------------------------------------------------

    def on_kv_reserve(self, msg: KvReserve) -> None:
        self.backlog[msg.request_id] = (msg, time.monotonic() + self.timeout_s)
        self._reserve_backlog()

    def on_kv_ready(self, msg: KvReady) -> None:
        r = self.receiving.get(msg.request_id)
        if r is not None:
            r.ready = msg
            self._admit(msg.request_id, r)

    def on_abort(self, request_id: str) -> None:
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

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        updates = [
            TokenUpdate(
                request_id=o.request_id, token_ids=o.new_token_ids,
                finished=o.finished, finish_reason=o.finish_reason, logprobs=o.logprobs,
            )
            for o in self.engine.step()
        ]  # fmt: skip
        if updates:
            self.io.to_gateway(Tokens(updates=updates))
            for u in updates:
                if u.finished:
                    log.info("decode finished", request_id=u.request_id, reason=u.finish_reason)

    # ---- helpers -----------------------------------------------------------------------------------

    def _reserve_backlog(self) -> None:
        for rid, (msg, deadline) in list(self.backlog.items()):
            try:
                blocks = self.engine.reserve(rid, msg.num_prompt_tokens, msg.params)
            except ValueError as exc:
                del self.backlog[rid]
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
                Region("kv", block_offset(layer, kind, b, area, bb), bb)
                for layer in range(self.engine.layout.num_layers)
                for kind in (0, 1)
                for b in landing
            ]
            handle = self.dataplane.expect(transfer_id, regions)
            handle.on_done(self.io.wake)
            self.receiving[rid] = _Receiving(msg, handle, deadline, blocks)
            dest = KvDest(
                request_id=rid, block_ids=landing, transfer_id=transfer_id, pool_blocks=area,
                block_bytes=bb, dataplane=self.dataplane.descriptor(),
            )  # fmt: skip
            self.io.send(msg.prefill_address, dest)

    def _admit(self, rid: str, r: _Receiving) -> None:
        if r.ready is not None and r.handle.poll() is TransferState.SUCCESS:
            del self.receiving[rid]
            self.landing.land(rid, r.pool_blocks)
            self.engine.admit_reserved(rid, r.ready.token_ids, r.ready.rope_delta)
            log.info("decode admitted", request_id=rid, prompt_tokens=r.ready.num_prompt_tokens)

    def _fail(self, rid: str, message: str, status: int = 502) -> None:
        log.warning("request failed", request_id=rid, error=message)
        self.on_abort(rid)
        self.io.to_gateway(RequestError(request_id=rid, message=message, status=status))
