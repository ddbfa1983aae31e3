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
    InstanceInfo,
    KvDest,
    KvReady,
    KvReserve,
    Load,
    Prefill,
    Register,
    RegisterAck,
    RequestError,
)  # fmt: skip
from services.host_config import HostConfig
from services.service_io import Inbound, ServiceIO, bounded_interval
from services.wire_checks import Refusals

log = get_logger("epd.host")


class Host:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.stopping = False
        self.io = ServiceIO(
            config.instance_id, config.gateway_address, f"tcp://{config.bind_host}:*", config.advertise_host,
            keys=config.keys,
        )  # fmt: skip
        self.encode = self.prefill = self.decode = None
        self.engine = None
        self.handlers: dict = {}
        self.refusals = Refusals(log)

    # ---- start-up ----------------------------------------------------------------------------------

    def start(self) -> None:
        import torch

        from common.dataplane import create_dataplane, resolve_backend
        from services.engine.config import EngineConfig
        from services.engine.engine import Engine
        from services.models.loader import load_model

        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        self.io.start()
        model = load_model(c.model_dir, device=c.device, dtype=c.dtype, roles=c.roles)
        self.model = model
        fam = model.family
        backend = resolve_backend(c.dataplane, same_host=True, device=c.device)
        where = {"device": c.device} if backend == "torchdist" else {}  # its library follows the device
        self.dataplane = create_dataplane(
            backend, host=c.bind_host, advertise_host=c.advertise_host, keys=c.keys, **where
        )
        roles = c.roles
        if "P" in roles or "D" in roles:
            ecfg = EngineConfig(
                kv_cache_memory=c.kv_cache_memory, gpu_memory_utilization=c.gpu_memory_utilization,
                max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                max_model_len=c.max_model_len, attention_backend=c.attention_backend,
                enforce_eager=c.enforce_eager, swap_space_bytes=c.swap_space_bytes,
            )  # fmt: skip
            kv_buffer = None
            decode_only = "D" in roles and "P" not in roles
            staged = self._stages_kv()
            if decode_only and not staged and c.device == "cpu":  # the pool lives in data-plane memory
                from services.engine.memory import size_kv_pool

                nbytes = size_kv_pool(fam, ecfg).nbytes  # the engine takes its size from the buffer
                kv_buffer = torch.frombuffer(self.dataplane.allocate("kv", nbytes), dtype=torch.uint8)
            prefill_only = "P" in roles and "D" not in roles
            self.engine = Engine(
                fam, model.eos_token_ids, ecfg, prefill_only=prefill_only, kv_buffer=kv_buffer
            )
            if decode_only and not staged and kv_buffer is None:  # a device pool the plane writes itself
                self.dataplane.register("kv", self.engine.kv.pool)
        if "P" in roles:
            from services.prefill.worker import PrefillWorker

            # Each layer's KV leaves while the next computes when the plane reads the device pool
            # itself (cudaipc, torchdist on a GPU: copies on a side stream). Otherwise it leaves after
            # the step, once the first token is sampled: on CPU a copy during the step takes a core
            # from the prompt, and host copies of a device pool mid-step would stall the device queue.
            self.prefill = PrefillWorker(
                fam, self.engine, self.io, self.dataplane, decodes="D" in roles,
                stream_kv_layers=self._moves_device_memory(),
            )  # fmt: skip
        elif "D" in roles:
            from services.decode.kv_landing import InPlaceLanding, StagedLanding
            from services.decode.worker import DecodeWorker

            kv = self.engine.kv
            if staged:
                landing = StagedLanding(kv, self.dataplane, self._staging_blocks())
                log.info("KV lands in a host staging area", staging_blocks=landing.num_blocks,
                         pool_blocks=kv.num_blocks, device=str(kv.device))  # fmt: skip
            else:
                landing = InPlaceLanding(kv)
            self.decode = DecodeWorker(self.engine, self.io, self.dataplane, landing=landing)
        if "E" in roles:
            from services.encode.worker import EncodeWorker

            self.encode = EncodeWorker(
                fam, self.io, self.dataplane, cache_bytes=c.encode_cache_bytes,
                max_batch_items=c.max_encode_batch, local_prefill=self.prefill, local_id=c.instance_id,
            )  # fmt: skip
        self.io.load = self.load
        self.handlers = self._handlers()
        self._register()

    def _moves_device_memory(self) -> bool:
        """Whether the data plane reads and writes this process's accelerator memory itself."""
        kind = self.config.device.partition(":")[0]
        return kind != "cpu" and kind in self.dataplane.devices

    def _stages_kv(self) -> bool:
        """Whether a decode pool is private memory fed through a host staging area: a device pool the
        data plane cannot write (shm, tcp, mooncake and nixl here move host memory), or on request
        (tests of that path on CPU)."""
        c = self.config
        if c.stage_kv is not None:
            return c.stage_kv
        return c.device != "cpu" and not self._moves_device_memory()

    def _staging_blocks(self) -> int:
        """Room for the prompts in flight: the larger of one whole context and four steps' worth of
        prompt tokens, never more than the pool."""
        e = self.engine
        tokens = max(e.max_model_len, 4 * e.config.max_num_batched_tokens)
        return min(e.kv.num_blocks, -(-tokens // e.kv.block_size) + 1)

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
        """Register with the gateway, retrying until it answers (it may start after us)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopping:
            self.io.to_gateway(Register(info=self.info()))
            for item in self.io.get(timeout=1.0):
                msg = item.msg
                if isinstance(msg, RegisterAck):
                    if msg.retry:
                        break
                    if not msg.accepted:
                        raise SystemExit(f"the gateway refused this instance: {msg.reason}")
                    self.io.heartbeat_interval = bounded_interval(msg.heartbeat_interval)
                    log.info("registered", instance=self.config.instance_id, roles=self.config.roles,
                             address=self.io.address)  # fmt: skip
                    return
                self._dispatch(item)
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
            load.waiting += len(self.prefill.waiting)
        dp = self.dataplane
        load.transfer_bytes = dp.bytes_sent + dp.bytes_received
        load.transfer_seconds = dp.seconds_sent + dp.seconds_received
        return load

    def run(self) -> None:
        workers = self._workers()
        stepper = self.prefill or self.decode
        while not self.stopping:
            busy = any(w.has_work() for w in workers)
            # idle: sleep until a message or a finished transfer wakes us (deadlines are coarse)
            for item in self.io.get(timeout=0 if busy else 0.05):
                self._dispatch(item)
            for w in workers:
                self._guarded(w, w.poll)
            if self.encode is not None and self.encode.has_work():
                self._guarded(self.encode, self.encode.run_batch)
            if stepper is not None and stepper.has_work():
                self._guarded(stepper, stepper.step)

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
            aborted = self._abort_all(self._workers(), None)
            log.warning("gateway asked to register again", reason=msg.reason, aborted=aborted)
            self.io.heartbeat_interval = 0
            self.io.to_gateway(Register(info=self.info()))
        elif msg.accepted:
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
