"""What one stage process builds for the roles it hosts: model parts, data plane, engine and workers.

The choices that depend on the device and the data plane live here: where a decode-only KV pool lives
(in data-plane memory on CPU, so the plane writes it in place; a registered device pool when the plane
moves device memory; private memory fed through a host staging area otherwise), whether prefill sends
each layer's KV while the next computes, and how the co-located roles hand work to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.log import get_logger
from services.host_config import HostConfig

log = get_logger("epd.host")


@dataclass(slots=True)
class Roles:
    model: Any
    dataplane: Any
    engine: Any = None  # prefill and decode share one engine
    encode: Any = None
    prefill: Any = None
    decode: Any = None
    kv_buffer_id: str = ""  # the data-plane buffer of a decode pool or its staging area ("": none)
    encoder_thread: Any = None  # the encoder's own thread, next to a prefill role (None: inline)

    def workers(self) -> list:
        return [w for w in (self.encode, self.prefill, self.decode) if w is not None]

    def release(self) -> None:
        """Let go of the roles' memory (a role change): the data-plane buffers of a decode pool and of
        the prefill's feature arena; the engine's pool and the cached features go with the last
        references to them."""
        if self.kv_buffer_id:
            self.dataplane.free(self.kv_buffer_id)
        if self.prefill is not None:
            self.prefill.features.close()
        if self.encoder_thread is not None:  # called on the loop's thread: it gets all its threads back
            self.encoder_thread.close()
            import torch

            torch.set_num_threads(self.encoder_thread.total_threads)
        self.engine = self.encode = self.prefill = self.decode = self.encoder_thread = None


def build_roles(
    c: HostConfig, io: Any, model: Any = None, dataplane: Any = None, generation: int = 0
) -> Roles:
    """The workers of `c.roles`. A role change passes the process's model (when its loaded parts
    serve the new roles) and data plane, and its count of role changes: each names its data-plane
    buffers afresh, because a peer may still map the old ones."""
    kv_buffer_id = f"kv-{generation}" if generation else "kv"
    feature_buffer_id = f"features-{generation}" if generation else "features"
    import torch

    from common.dataplane import create_dataplane, resolve_backend
    from services.models.loader import load_model

    if model is None:  # a role change passes the model it keeps: its tower was cast when it was loaded
        model = load_model(c.model_dir, device=c.device, dtype=c.dtype, roles=c.roles,
                           encoder_dtype=c.encoder_dtype if "E" in c.roles else None,
                           linear_backend=c.linear_backend)  # fmt: skip
    if dataplane is None:
        backend = resolve_backend(c.dataplane, same_host=True, device=c.device)
        where = {"device": c.device} if backend == "torchdist" else {}  # its library follows the device
        dataplane = create_dataplane(
            backend, host=c.bind_host, advertise_host=c.advertise_host, keys=c.keys, **where
        )
    built = Roles(model, dataplane)
    fam, roles = model.family, c.roles
    moves_device = _moves_device_memory(c, dataplane)
    if "P" in roles or "D" in roles:
        from services.engine.config import EngineConfig
        from services.engine.engine import Engine

        ecfg = EngineConfig(
            kv_cache_memory=c.kv_cache_memory, gpu_memory_utilization=c.gpu_memory_utilization,
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            max_model_len=c.max_model_len, attention_backend=c.attention_backend,
            enforce_eager=c.enforce_eager, swap_space_bytes=c.swap_space_bytes,
            enable_prefix_caching=c.enable_prefix_caching,
        )  # fmt: skip
        kv_buffer = None
        decode_only = "D" in roles and "P" not in roles
        staged = _stages_kv(c, moves_device)
        if decode_only and not staged and c.device == "cpu":  # the pool lives in data-plane memory
            from services.engine.memory import size_kv_pool

            nbytes = size_kv_pool(fam, ecfg).nbytes  # the engine takes its size from the buffer
            kv_buffer = torch.frombuffer(dataplane.allocate(kv_buffer_id, nbytes), dtype=torch.uint8)
            built.kv_buffer_id = kv_buffer_id
        prefill_only = "P" in roles and "D" not in roles
        built.engine = Engine(fam, model.eos_token_ids, ecfg, prefill_only=prefill_only, kv_buffer=kv_buffer)
        if decode_only and not staged and kv_buffer is None:  # a device pool the plane writes itself
            dataplane.register(kv_buffer_id, built.engine.kv.pool)
            built.kv_buffer_id = kv_buffer_id
    if "P" in roles:
        from services.prefill.worker import PrefillWorker

        # Each layer's KV leaves while the next computes when the plane reads the device pool itself
        # (cudaipc, torchdist on a GPU: copies on a side stream). Otherwise it leaves after the step,
        # once the first token is sampled: on CPU a copy during the step takes a core from the prompt,
        # and host copies of a device pool mid-step would stall the device queue.
        built.prefill = PrefillWorker(
            fam, built.engine, io, dataplane, decodes="D" in roles, stream_kv_layers=moves_device,
            feature_buffer_id=feature_buffer_id,
        )  # fmt: skip
    elif "D" in roles:
        from services.decode.kv_landing import InPlaceLanding, StagedLanding
        from services.decode.worker import DecodeWorker

        kv = built.engine.kv
        if staged:
            landing = StagedLanding(kv, dataplane, _staging_blocks(built.engine), buffer_id=kv_buffer_id)
            built.kv_buffer_id = kv_buffer_id
            log.info("KV lands in a host staging area", staging_blocks=landing.num_blocks,
                     pool_blocks=kv.num_blocks, device=str(kv.device))  # fmt: skip
        else:
            landing = InPlaceLanding(kv)
        built.decode = DecodeWorker(built.engine, io, dataplane, landing=landing, buffer_id=kv_buffer_id)
    if "E" in roles:
        from services.encode.worker import EncodeWorker

        built.encoder_thread = _encoder_thread(c, built, io)
        built.encode = EncodeWorker(
            fam, io, dataplane, cache_bytes=c.encode_cache_bytes, max_batch_items=c.max_encode_batch,
            max_batch_tokens=c.encode_batch_tokens, local_prefill=built.prefill, local_id=c.instance_id,
            encoder_thread=built.encoder_thread,
        )  # fmt: skip
    return built


def _encoder_thread(c: HostConfig, built: Roles, io: Any) -> Any:
    """An encoder thread (services/encode/encoder_thread.py) for a process that encodes and prefills:
    `on`, or `auto` on a CPU, where the encoder and the engine share the cores. `auto` keeps an
    accelerator's encoder inline: its kernels queue on the device behind the engine's anyway."""
    wanted = c.encoder_thread == "on" or (c.encoder_thread == "auto" and c.device == "cpu")
    if not wanted or built.engine is None:
        return None
    import torch

    from services.encode.encoder_thread import EncoderThread

    engine, threads = built.engine, torch.get_num_threads()
    log.info("encoder calls on a thread of their own", threads=threads)
    requests = engine.scheduler.requests
    return EncoderThread(built.model.family.encode, threads, engine_load=lambda: len(requests), wake=io.wake)


def _moves_device_memory(c: HostConfig, dataplane: Any) -> bool:
    """Whether the data plane reads and writes this process's accelerator memory itself."""
    kind = c.device.partition(":")[0]
    return kind != "cpu" and kind in dataplane.devices


def _stages_kv(c: HostConfig, moves_device: bool) -> bool:
    """Whether a decode pool is private memory fed through a host staging area: a device pool the data
    plane cannot write (shm, tcp, mooncake and nixl here move host memory), or on request (tests of
    that path on CPU)."""
    if c.stage_kv is not None:
        return c.stage_kv
    return c.device != "cpu" and not moves_device


def _staging_blocks(engine: Any) -> int:
    """Room for the prompts in flight: the larger of one whole context and four steps' worth of prompt
    tokens, never more than the pool."""
    tokens = max(engine.max_model_len, 4 * engine.config.max_num_batched_tokens)
    return min(engine.kv.num_blocks, -(-tokens // engine.kv.block_size) + 1)
