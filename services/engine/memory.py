"""How big the KV pool is, and how long a sequence may grow in it: computed once per engine.

The pool gets, in this order of precedence:
  - `num_blocks` blocks, when the config names them (tests);
  - exactly `kv_cache_memory` bytes, when the config gives them;
  - on CPU, a fixed `CPU_KV_CACHE_MEMORY` (host memory has no budget torch can report, and a stage
    process shares the host with others);
  - on an accelerator (cuda, npu), what is left of `gpu_memory_utilization` of the device's memory
    after the weights and a profiling step of `max_num_batched_tokens` tokens, measured with the
    device's own memory statistics (see `measure_device` and `accelerator_kv_bytes`).
Then `fit_max_model_len` caps the model's context at what one sequence can hold in that pool.

A decode-only process calls `size_kv_pool` before it builds its engine, to allocate the pool in
data-plane memory; every other engine calls it from `Engine.__init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from common.log import get_logger
from common.sampling_params import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.model_runner import ModelRunner
from services.engine.scheduler import ScheduledChunk, SchedulerOutput
from services.engine.sequence import Sequence

log = get_logger("epd.engine.memory")

CPU_KV_CACHE_MEMORY = 256 * 2**20  # bytes of KV pool on CPU when the config gives none
MIN_POOL_BLOCKS = 2  # below this not even a short sequence fits: refuse to start


@dataclass(frozen=True, slots=True)
class PoolSize:
    num_blocks: int  # physical blocks of the pool, the scratch block included
    block_size: int
    token_bytes: int  # KV bytes of one token, all layers, keys and values

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.token_bytes


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """What a profiling step measured on an accelerator, in bytes."""

    total: int  # the device's memory
    free: int  # free on the device after the step, cache emptied (other processes count as used)
    torch_peak: int  # most this process's allocator held during the step: weights + activations
    torch_allocated: int  # what it holds after the step: the weights and whatever else stays
    non_torch_increase: int  # memory outside the allocator the step added (library workspaces)


def kv_layout(family: Any) -> KVLayout:
    return KVLayout(family.num_layers, family.num_kv_heads, family.head_dim, family.dtype)


def accelerator_kv_bytes(mem: DeviceMemory, utilization: float) -> int:
    """KV bytes on an accelerator: this process may use `utilization` of the device (a per-process
    share, as vLLM's `gpu_memory_utilization`), less the weights and the step's peak, less what the
    step added outside torch's allocator. Never more than is free now once the step's activations
    have room again, so a device shared with other processes shrinks the pool instead of failing
    later; 0 when nothing is left."""
    activations = mem.torch_peak - mem.torch_allocated
    budget = int(utilization * mem.total) - mem.torch_peak - mem.non_torch_increase
    return max(0, min(budget, mem.free - activations))


def fit_max_model_len(requested: int | None, model_max: int, pool_tokens: int) -> int:
    """The context length: `requested` when the pool holds it (an error when it does not), else the
    model's `max_position_embeddings` capped at what one sequence can hold in the pool."""
    if requested is not None:
        if requested > pool_tokens:
            raise ValueError(
                f"max_model_len {requested} is more than the KV pool holds ({pool_tokens} tokens): give "
                f"the pool more memory (kv_cache_memory, gpu_memory_utilization) or ask for at most "
                f"{pool_tokens}"
            )
        return requested
    if model_max > pool_tokens:
        log.info(
            "max_model_len capped to what the KV pool holds",
            max_model_len=pool_tokens,
            max_position_embeddings=model_max,
        )
        return pool_tokens
    return model_max


def size_kv_pool(family: Any, config: EngineConfig) -> PoolSize:
    """The one computation of the pool's size (profiles the device when it has to measure)."""
    layout = kv_layout(family)
    bs = config.block_size
    token_bytes = layout.token_bytes()
    if config.num_blocks is not None:  # blocks sequences may use, plus the scratch block
        num_blocks, hint = config.num_blocks + 1, "give more num_blocks"
    else:
        if config.kv_cache_memory is not None:
            nbytes, hint = config.kv_cache_memory, "give more kv_cache_memory"
        elif torch.device(family.device).type == "cpu":
            nbytes, hint = CPU_KV_CACHE_MEMORY, "give kv_cache_memory"
        else:
            mem = measure_device(family, config, layout)
            nbytes = accelerator_kv_bytes(mem, config.gpu_memory_utilization)
            hint = "raise gpu_memory_utilization, free device memory or lower max_num_batched_tokens"
            log.info(
                "KV pool sized from device memory",
                kv_gib=round(nbytes / 2**30, 2),
                total_gib=round(mem.total / 2**30, 2),
                utilization=config.gpu_memory_utilization,
                weights_and_peak_gib=round(mem.torch_peak / 2**30, 2),
                free_gib=round(mem.free / 2**30, 2),
            )
        num_blocks = nbytes // (token_bytes * bs)
    if num_blocks - 1 < MIN_POOL_BLOCKS:  # the last block is the runner's scratch block
        raise ValueError(
            f"the KV pool has room for {num_blocks - 1} blocks of {bs} tokens ({token_bytes * bs} bytes "
            f"each), fewer than the {MIN_POOL_BLOCKS} a short sequence needs: {hint}"
        )
    return PoolSize(num_blocks, bs, token_bytes)


# ---- measuring an accelerator ---------------------------------------------------------------------


def device_api(kind: str) -> Any:
    """The memory-statistics module of a device type; torch-npu is imported only when asked for."""
    if kind == "cuda":
        return torch.cuda
    if kind == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu)

        return torch.npu
    raise ValueError(f"no memory statistics for device type {kind!r}")


def measure_device(family: Any, config: EngineConfig, layout: KVLayout) -> DeviceMemory:
    """Run `profile_step` between the device's memory counters, as vLLM does."""
    device = torch.device(family.device)
    api = device_api(device.type)
    api.synchronize(device)
    api.empty_cache()
    free, total = api.mem_get_info(device)
    non_torch_before = total - free - api.memory_reserved(device)
    api.reset_peak_memory_stats(device)
    profile_step(family, config, layout)
    api.synchronize(device)
    peak = api.max_memory_allocated(device)
    api.empty_cache()
    free, total = api.mem_get_info(device)
    non_torch_after = total - free - api.memory_reserved(device)
    return DeviceMemory(
        total=total,
        free=free,
        torch_peak=peak,
        torch_allocated=api.memory_allocated(device),
        non_torch_increase=max(0, non_torch_after - non_torch_before),
    )


def profile_step(family: Any, config: EngineConfig, layout: KVLayout) -> None:
    """One step as large as a real one can be: `max_num_batched_tokens` tokens, most in one prompt
    chunk (the largest attention call) and one token for each other sequence the batch may hold (so
    that `max_num_seqs` rows of logits are sampled). Its K/V go to a temporary pool just large
    enough (plus the last block, which the runner keeps as its scratch slot), freed on return. The
    runner runs eagerly: no CUDA graphs are captured for a pool that is thrown away, and uncompiled
    kernels peak at least as high as compiled ones, which errs on the safe side."""
    n = config.max_num_batched_tokens
    k = max(1, min(config.max_num_seqs, n))
    lengths = [n - (k - 1)] + [1] * (k - 1)
    bm = BlockManager(sum(-(-m // config.block_size) for m in lengths), config.block_size)
    kv = KVCache(layout, bm.num_blocks + 1, config.block_size, device=family.device)
    step = SchedulerOutput()
    for i, m in enumerate(lengths):
        seq = Sequence(f"profile-{i}", [0] * m, SamplingParams(max_tokens=1))
        bm.grow(seq, m)
        step.chunks.append(ScheduledChunk(seq, 0, m))
    ModelRunner(family, kv, replace(config, enforce_eager=True), max(lengths)).execute(step)
