"""One stage process hosting one or more roles (E, P, D) of one model.

Co-location is a matter of which workers share this process: an encoder next to a prefill role hands
features over in-process (no copy); prefill next to decode is one engine that simply keeps decoding
(the KV never moves). The compute loop below drains the inbox, polls transfers and deadlines, then
runs one encoder batch and one engine step, and goes round again; sockets live on the I/O thread.

Nothing a message carries takes the process down: each worker checks what it receives before use and
fails the request of a bad message; a handler, poll or step that raises anyway fails the requests
it concerns (all of that worker's, when it cannot tell) and the loop goes on. When the gateway has
forgotten this process (RegisterAck with retry: it restarted, or declared us dead after missed
heartbeats and failed our requests), everything held here is aborted before registering again, so a
process that was stalled does not keep decoding requests whose clients are gone.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from common.log import get_logger
from common.protocol import (
    Abort,
    Encode,
    FeatureDest,
    FeatureOffer,
    Handoff,
    InstanceInfo,
    KvDest,
    KvReady,
    KvReserve,
    Leaving,
    Load,
    Prefill,
    Register,
    RegisterAck,
    RequestError,
    SetRoles,
)  # fmt: skip
from common.role_sets import canonical_roles, roles_problem
from common.stage_histograms import merged
from services.compute_priority import default_nice, lower_compute_priority
from services.host_config import HostConfig
from services.role_change import PendingChange, rebuild
from services.service_io import Inbound, ServiceIO, bounded_interval
from services.wire_checks import Refusals

log = get_logger("epd.host")

# How long a stage that re-registered ignores further "register again" answers. Heartbeats queued
# while the gateway was down are each answered with one; they all come before the answer to our
# Register, so without this the stage would abort and register once per queued heartbeat. Bounded, so
# a Register that got lost is still sent again on the next retry.
REJOIN_WAIT_S = 2.0


class Host:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.stopping = False
        self.io = ServiceIO(
            config.instance_id, config.gateway_address, f"tcp://{config.bind_host}:*", config.advertise_host,
            keys=config.keys,
        )  # fmt: skip
        self.encode = self.prefill = self.decode = None
        self.engine = self.built = self.model = self.dataplane = None
        self.generation = 0  # role changes so far (services/role_change.py)
        self.change: PendingChange | None = None  # a SET_ROLES waiting for this process to be idle
        self.handlers: dict = {}
        self.refusals = Refusals(log)
        self.rejoin_pending_until = 0.0  # monotonic time until which further retries are ignored
        self.engine_threads = 0  # torch threads of this thread's engine steps, beside an encoder thread

    # ---- start-up ----------------------------------------------------------------------------------

    def start(self) -> None:
        import torch

        from services.roles import build_roles

        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        self.io.start()  # before the compute thread's priority drops: the I/O thread keeps its own
        nice = default_nice(c.device) if c.compute_nice is None else c.compute_nice
        if lower_compute_priority(nice):
            log.info("compute threads below the I/O thread in priority", nice=nice)
        self.adopt(build_roles(c, self.io))
        self.io.load = self.load
        self._register()

    def adopt(self, built) -> None:
        """Serve with these workers (at start, and after a role change)."""
        self.built, self.model, self.dataplane, self.engine = (
            built,
            built.model,
            built.dataplane,
            built.engine,
        )
        self.encode, self.prefill, self.decode = built.encode, built.prefill, built.decode
        self.handlers = self._handlers()
        if built.encoder_thread is not None:
            self.engine_threads = built.encoder_thread.total_threads

    def info(self) -> InstanceInfo:
        c, e = self.config, self.engine
        info = InstanceInfo(
            instance_id=c.instance_id, roles=c.roles, address=self.io.address, model=self.model.name,
            dataplane=self.dataplane.descriptor(), pid=os.getpid(), host=socket.gethostname(),
        )  # fmt: skip
        if e is not None:
            info.kv_block_size = e.kv.block_size
            info.kv_num_blocks = e.kv.num_blocks
            info.kv_num_layers = e.layout.num_layers
            info.max_model_len = e.max_model_len
        return info

    def _register(self, timeout_s: float = 60.0) -> None:
        """Register with the gateway, retrying until it answers (it may start after us). Everything
        else in the batch the answer came in is handled too: the gateway places work here the moment
        it has registered us, and that work may come just before or just after its answer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopping:
            self.io.to_gateway(Register(info=self.info()))
            accepted = False
            for item in self.io.get(timeout=1.0):
                msg = item.msg
                if isinstance(msg, Register) and msg.info.address == self.io.address:
                    raise SystemExit(f"{self.config.gateway_address} is this instance's own address, "
                                     "not the gateway's (its port was free when the gateway's was chosen?)")  # fmt: skip
                if accepted or not isinstance(msg, RegisterAck):
                    self._dispatch(item)
                elif not msg.retry:  # a retry: register again after this batch
                    if not msg.accepted:
                        raise SystemExit(f"the gateway refused this instance: {msg.reason}")
                    self.io.heartbeat_interval = bounded_interval(msg.heartbeat_interval)
                    log.info("registered", instance=self.config.instance_id, roles=self.config.roles,
                             address=self.io.address)  # fmt: skip
                    accepted = True
            if accepted:
                return
        raise SystemExit(f"no answer from the gateway at {self.config.gateway_address}")

    # ---- the loop ----------------------------------------------------------------------------------

    def load(self) -> Load:
        e = self.engine
        load = Load(encode_queue=self.encode.queue_depth if self.encode else 0)
        if e is not None:
            load.waiting = len(e.scheduler.waiting) + len(e.scheduler.swapped) + len(e.scheduler.arrived)
            load.running = len(e.scheduler.running)
            load.free_kv_blocks = e.block_manager.num_free_blocks
            load.total_kv_blocks = e.block_manager.num_blocks
        if self.prefill is not None:
            load.feature_waiting = len(self.prefill.waiting)
            load.waiting += load.feature_waiting
        dp = self.dataplane
        load.transfer_bytes = dp.bytes_sent + dp.bytes_received
        load.transfer_seconds = dp.seconds_sent + dp.seconds_received
        load.phases = merged(*(w.phases.snapshot() for w in self._workers()))
        if self.encode is not None:
            load.cache_hits = dict(self.encode.cache_counts.hits)
            load.cache_misses = dict(self.encode.cache_counts.misses)
        return load

    def run(self) -> None:
        while not self.stopping:
            workers, stepper = self._workers(), self.prefill or self.decode
            busy = any(w.has_work() for w in workers)
            # idle: sleep until a message or a finished transfer wakes us (deadlines are coarse)
            for item in self.io.get(timeout=0 if busy else 0.05):
                self._dispatch(item)
            for w in workers:
                self._guarded(w, w.poll)
            if self.encode is not None and self.encode.has_work():
                self._share_threads()  # an inline call after a threaded one gets every thread back
                self._guarded(self.encode, self.encode.run_batch)
            if stepper is not None and stepper.has_work():
                self._share_threads()
                self._guarded(stepper, stepper.step)
            if self.change is not None and self._idle():
                self._change_roles()

    def _share_threads(self) -> None:
        """Before an engine step or an encoder batch: the threads an encoder call in flight on the
        encoder thread leaves this thread (services/encode/encoder_thread.py); all when none runs."""
        thread = self.built.encoder_thread if self.built is not None else None
        if thread is None:
            return
        wanted = thread.engine_threads()
        if wanted != self.engine_threads:
            import torch

            torch.set_num_threads(wanted)  # this thread's count only (OpenMP's is per thread)
            self.engine_threads = wanted

    # ---- role changes (services/role_change.py) ----------------------------------------------------

    def _on_set_roles(self, msg: SetRoles) -> None:
        roles = canonical_roles(msg.roles)
        problem = roles_problem(msg.roles)
        if msg.sender != "gateway":
            problem = "a role change that is not the gateway's"
        if problem:
            self.refusals.count(msg, problem)
            return
        self.change = PendingChange(roles, msg.reason[:200])
        log.info("role change asked", roles=roles or "(leave)", reason=msg.reason[:200])

    def _idle(self) -> bool:
        return all(w.idle() if hasattr(w, "idle") else not w.request_ids() for w in self._workers())

    def _change_roles(self) -> None:
        change, self.change = self.change, None
        assert change is not None
        if not change.roles:
            log.info("drained; leaving", seconds=round(time.monotonic() - change.asked_at, 3))
            self.io.to_gateway(Leaving(reason=change.reason))
            time.sleep(0.2)  # the I/O thread sends it before the process goes
            self.stopping = True
            return
        try:
            rebuild(self, change.roles)
        except Exception:  # nothing is left to serve with: exit, and let a supervisor start it again
            log.exception("the role change failed; exiting", roles=change.roles)
            raise SystemExit(1) from None
        self.io.to_gateway(Register(info=self.info()))  # the ack comes to _on_ack

    def _guarded(self, worker, call) -> None:
        """Run one of a worker's loop duties. The workers fail the requests a bad message or a failed
        step concerns themselves; an error that still gets here cannot be pinned on one request, so
        every request of that worker fails (500) and the process goes on serving new ones."""
        try:
            call()
        except Exception as exc:
            log.exception("a worker failed; failing its requests", worker=type(worker).__name__)
            self._abort_all([worker], f"internal error: {exc}")

    def _handlers(self) -> dict:
        """Message type -> handler(msg, frames, peer), for the roles this process hosts."""
        h: dict = {
            Abort: lambda m, f, p: self._abort(m.request_id),
            RegisterAck: lambda m, f, p: self._on_ack(m),
            SetRoles: lambda m, f, p: self._on_set_roles(m),
        }
        if self.encode is not None:
            h[Encode] = lambda m, f, p: self.encode.on_encode(m, f)
            h[FeatureDest] = lambda m, f, p: self.encode.on_feature_dest(m)
        if self.prefill is not None:
            h[FeatureOffer] = lambda m, f, p: self.prefill.on_feature_offer(m)
            h[Prefill] = lambda m, f, p: self.prefill.on_prefill(m)
            h[KvDest] = lambda m, f, p: self.prefill.on_kv_dest(m)
        if self.decode is not None:
            h[KvReserve] = lambda m, f, p: self.decode.on_kv_reserve(m, peer=p)
            h[KvReady] = lambda m, f, p: self.decode.on_kv_ready(m)
            h[Handoff] = lambda m, f, p: self.decode.on_handoff(m)
            if self.prefill is None:  # the destination of a request this decode instance hands off
                h[KvDest] = lambda m, f, p: self.decode.on_kv_dest(m)
        return h

    def _dispatch(self, item: Inbound) -> None:
        msg = item.msg
        if isinstance(msg, RegisterAck) and msg.retry and not item.from_gateway_reply:
            # the gateway asks over our own connection to it; from anyone else this would be a way
            # to make the process drop every request it holds
            self.refusals.count(msg, "a request to register again that is not the gateway's answer")
            return
        handler = self.handlers.get(type(msg))
        if handler is None:
            self.refusals.count(msg, "a message for a role this process does not host")
            return
        try:
            handler(msg, item.frames, item.peer)
        except Exception as exc:  # a bad message fails its request, never the process
            log.exception("handling a message failed", type=type(msg).__name__)
            request_id = getattr(msg, "request_id", None)
            if request_id:
                self._abort(request_id)
                self.io.to_gateway(RequestError(request_id=request_id, message=f"internal error: {exc}"))

    def _on_ack(self, msg: RegisterAck) -> None:
        if msg.retry:  # the gateway forgot us (restart, missed heartbeats): join again, empty-handed
            now = time.monotonic()
            if now < self.rejoin_pending_until:
                return  # the answer to a heartbeat sent before our Register: that one is on its way
            self.rejoin_pending_until = now + REJOIN_WAIT_S
            aborted = self._abort_all(self._workers(), None)
            log.warning("gateway asked to register again", reason=msg.reason, aborted=aborted)
            self.io.heartbeat_interval = 0
            self.io.to_gateway(Register(info=self.info()))
        elif msg.accepted:
            self.rejoin_pending_until = 0.0
            self.io.heartbeat_interval = bounded_interval(msg.heartbeat_interval)

    def _abort(self, request_id: str) -> None:
        for w in self._workers():
            w.on_abort(request_id)

    def _workers(self) -> list:
        return [w for w in (self.encode, self.prefill, self.decode) if w is not None]

    def _abort_all(self, workers: list, error: str | None) -> int:
        """Abort every request `workers` hold, in every role here (their blocks are freed); with
        `error`, tell the gateway each one failed. Returns how many there were."""
        request_ids = set().union(*(w.request_ids() for w in workers))
        for rid in request_ids:
            self._abort(rid)
            if error is not None:
                self.io.to_gateway(RequestError(request_id=rid, message=error, status=500))
        return len(request_ids)

    def stop(self, *_) -> None:
        self.stopping = True

    def close(self) -> None:
        self.io.stop()
        if getattr(self, "dataplane", None) is not None:
            self.dataplane.close()


def serve(config: HostConfig) -> int:
    from common.log import configure_logging

    configure_logging(config.instance_id, quiet_libraries=True)
    host = Host(config)
    signal.signal(signal.SIGTERM, host.stop)
    signal.signal(signal.SIGINT, host.stop)
    try:
        host.start()
        host.run()
    finally:
        host.close()
    return 0
