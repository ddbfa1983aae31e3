"""The gateway's backend: places requests on stage instances over ZeroMQ and streams their tokens back.

For each request: pick the prefill instance (least loaded), the decode instance (the prefill instance
itself when it decodes too, else the least loaded decode instance) and, for requests with images, the
encode instance (the prefill instance when it encodes too, else by cache affinity, then load). Then,
all at once: KV_RESERVE to decode, ENCODE (with the image bytes as raw frames) to encode, PREFILL to
prefill. Tokens come back as FIRST_TOKEN (prefill) and TOKENS (decode) and are fed to the request's
queue. An instance that stops heartbeating fails the requests it holds at once, and they are aborted
at every other instance that may still work on them; an abort reaches every instance holding the
request, and the prefill instance too after its first token (it may still be shipping the KV).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import zmq.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from common.mailbox import Mailbox
from common.protocol import (
    Abort,
    FirstToken,
    Heartbeat,
    Leaving,
    Register,
    RequestError,
    Tokens,
)  # fmt: skip
from common.stack_keys import StackKeys
from gateway import stage_messages
from gateway.backend import BackendError, GenerateRequest, TokenEvent
from gateway.flights import Flight, Flights
from gateway.instance_metrics import InstanceCollector, StageClock, StageTimings
from gateway.membership import Membership
from gateway.planner import Planner
from gateway.planner_config import PlannerConfig
from gateway.planner_loop import PlannerLoop
from gateway.planner_slo import SloWindow
from gateway.prefix_affinity import PrefixAffinity
from gateway.registry import Registry
from gateway.role_changes import RoleChanges

log = logging.getLogger("epd.gateway.cluster")
OUT_OF_ORDER = "a decode instance sent tokens whose positions leave a gap that never closes"


class Cluster:
    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        control_address: str = "tcp://127.0.0.1:*",
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 3.0,
        prefill_deadline_s: float = 30.0,
        keys: StackKeys | None = None,
        planner: PlannerConfig | None = None,
    ) -> None:
        """`keys`: the stack's CurveZMQ keys; only processes holding them can reach this gateway.
        `planner`: role changes decided from the load (gateway/planner.py); default off."""
        self.model_name = model_name
        self._max_model_len = max_model_len  # from the checkpoint's config or the command line
        self.registry = Registry(model_name, heartbeat_timeout)
        self.heartbeat_interval = heartbeat_interval
        self.prefill_deadline_s = prefill_deadline_s
        self._control_address = control_address
        self.keys = keys
        self.flights = Flights(self.registry)
        self.affinity = PrefixAffinity()
        self._tasks: list[asyncio.Task] = []
        self.ctx: zmq.asyncio.Context | None = None
        self.mailbox: Mailbox | None = None
        self.timings = StageTimings()
        self.role_changes = RoleChanges(self.registry, self.flights, lambda a, m: self._mailbox().send(a, m))
        self.membership = Membership(
            self.registry,
            self.flights,
            self.role_changes,
            self._mailbox,
            self._send_abort,
            heartbeat_interval,
        )
        self.slo = SloWindow()  # fed by the request path (gateway/streaming.py), read by the planner
        self.planner = Planner(planner or PlannerConfig())
        self._collectors: list[Collector] = [
            InstanceCollector(self.registry),
            *self.timings.collectors(),
            *self.planner.collectors(),
        ]
        self._metrics_registry = CollectorRegistry(auto_describe=True)
        for collector in self._collectors:
            self._metrics_registry.register(collector)

    @property
    def address(self) -> str:
        assert self.mailbox is not None
        return self.mailbox.address

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.mailbox = Mailbox(self.ctx, "gateway", self._control_address, keys=self.keys)
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self.membership.watch())]
        if self.planner.config.mode != "off":
            instances = lambda: list(self.registry.instances.values())  # noqa: E731
            loop = PlannerLoop(self.planner, instances, self.slo, self.set_roles)
            self._tasks.append(asyncio.create_task(loop.run()))

    def _mailbox(self) -> Mailbox:
        assert self.mailbox is not None
        return self.mailbox

    def set_roles(self, instance_id: str, roles: str, reason: str = "") -> str:
        """Ask an instance to serve other roles, or none (a drain): gateway/role_changes.py. Raises
        `RoleChangeError` when the change cannot be asked."""
        return self.role_changes.set_roles(instance_id, roles, reason)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.mailbox is not None:
            self.mailbox.close()
        if self.ctx is not None:
            self.ctx.term()

    async def wait_for(self, counts: dict[str, int], timeout: float) -> bool:
        """Wait until at least `counts[role]` instances of each role have registered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            have = self.registry.counts()
            if all(have.get(r, 0) >= n for r, n in counts.items()):
                return True
            await asyncio.sleep(0.05)
        return False

    # ---- the Backend interface -------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """The configured context, lowered to what the live instances hold: an engine caps its context
        at its KV pool, and a prompt over it is refused here (400) rather than failing at a stage."""
        live = self.registry.max_model_len()
        return self._max_model_len if live is None else min(self._max_model_len, live)

    def health(self) -> tuple[bool, dict]:
        counts = self.registry.counts()
        return all(counts[r] > 0 for r in "EPD"), {"instances": counts}

    def collectors(self) -> list[Collector]:
        """The per-instance figures and stage timings, for the gateway app to register in its own
        registry (one exposition); `metrics_text` is the same for a caller without a registry."""
        return list(self._collectors)

    def metrics_text(self) -> bytes:
        return generate_latest(self._metrics_registry)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            queue = self._place(request).queue
            while True:
                item = await queue.get()
                if isinstance(item, BackendError):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:  # whatever ended it (a failed send while placing it included): free it everywhere
            self._end(request.request_id, finished)

    async def abort(self, request_id: str) -> None:
        flight = self.flights.get(request_id)
        if flight is not None and not flight.aborted:
            self._send_abort(request_id, flight)
            flight.queue.put_nowait(TokenEvent([], finished=True, finish_reason="abort"))

    # ---- placing a request -----------------------------------------------------------------------

    def _place(self, req: GenerateRequest) -> Flight:
        reg = self.registry
        prefills = reg.candidates("P")
        if not prefills:
            raise BackendError(503, "no live prefill instance")
        keys = []
        if len(prefills) > 1:  # where this prompt's prefix was computed last: its KV may be cached there
            keys = self.affinity.keys(req.token_ids, [(m.hash, m.num_tokens) for m in req.images])
        prefill, _ = self.affinity.choose(keys, prefills, reg.load_order)
        self.affinity.remember(keys, prefill.id)
        decode = prefill if prefill.has("D") else reg.least_loaded("D")
        if decode is None:
            raise BackendError(503, "no live decode instance")
        hashes = [img.hash for img in req.images]
        encode = None
        if req.images:
            encode = prefill if prefill.has("E") else reg.encoder_for(hashes)
            if encode is None:
                raise BackendError(503, "no live encode instance")
        rid = req.request_id
        clock = StageClock(split=decode is not prefill, with_images=bool(req.images))
        flight = self.flights.add(
            rid, Flight(asyncio.Queue(), decode_id=decode.id, prefill_id=prefill.id, clock=clock)
        )
        assert self.mailbox is not None
        if decode is not prefill:
            self.flights.hold(flight, decode, "D", rid)
            self.mailbox.send(decode.address, stage_messages.kv_reserve(req, prefill))
        if encode is not None:
            self.flights.hold(flight, encode, "E", rid)
            self.mailbox.send(encode.address, *stage_messages.encode(req, prefill))
            reg.remember_encoded(hashes, encode.id)
        self.flights.hold(flight, prefill, "P", rid)
        self.mailbox.send(prefill.address, stage_messages.prefill(req, decode, self.prefill_deadline_s))
        return flight

    def _end(self, rid: str, finished: bool) -> None:
        """The request's iteration ended: abort it at its instances unless it finished or was aborted
        (client gone, stop string, stage failure), and free its load counts even if the abort fails."""
        flight = self.flights.get(rid)
        if flight is None:
            return
        try:
            if not finished and not flight.aborted:
                self._send_abort(rid, flight)
        finally:
            self.flights.land(rid)

    def _send_abort(self, rid: str, flight: Flight, dead: str = "") -> None:
        """Abort `rid` at every live instance that holds it or may still work on it, never at `dead`."""
        assert self.mailbox is not None
        for address in self.flights.abort_targets(flight, dead):
            self.mailbox.send(address, Abort(request_id=rid))

    # ---- messages --------------------------------------------------------------------------------

    async def _receive(self) -> None:
        assert self.mailbox is not None
        while True:
            route, msg, _ = await self.mailbox.recv_from()
            try:
                self._handle(msg, route)
            except Exception:  # one bad message never takes the gateway down
                log.exception("handling %s failed", type(msg).__name__)

    def _handle(self, msg, route: bytes = b"") -> None:
        assert self.mailbox is not None
        if isinstance(msg, Heartbeat):
            self.membership.heartbeat(msg, route)
            return
        if isinstance(msg, Register):
            self.membership.register(msg.info, route)
            return
        flight = self.flights.get(getattr(msg, "request_id", ""))
        if isinstance(msg, FirstToken):
            if flight is None:
                return
            self.flights.release(msg.request_id, flight, keep=flight.decode_id)
            self.timings.first_token(flight.clock)
            self.role_changes.after_first_token(msg.request_id, flight)
            if msg.finished and flight.holders:
                self._send_abort(msg.request_id, flight)  # decode reserved blocks it will not need
            event = TokenEvent(
                [msg.token_id], msg.finished, msg.finish_reason, msg.logprobs, msg.num_cached_tokens
            )
            flight.deliver(0, event)
        elif isinstance(msg, Tokens):
            for u in msg.updates:
                f = self.flights.get(u.request_id)
                if f is not None:
                    self.role_changes.on_tokens(u.request_id, f, msg.sender)
                    self.timings.decode_tokens(f.clock)
                    event = TokenEvent(list(u.token_ids), u.finished, u.finish_reason, u.logprobs)
                    if not f.deliver(u.position, event):
                        self._send_abort(u.request_id, f)
                        f.queue.put_nowait(BackendError(502, OUT_OF_ORDER))
        elif isinstance(msg, RequestError) and flight is not None:
            self._send_abort(msg.request_id, flight)
            flight.queue.put_nowait(BackendError(msg.status, msg.message))
        elif isinstance(msg, Leaving):
            self.membership.leaving(msg.sender, route)
