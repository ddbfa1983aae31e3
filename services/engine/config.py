"""Engine configuration: one dataclass with defaults and checks (sizes: see memory.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = (
        None  # blocks sequences may use (the pool has one more, the scratch block); None: sized
    )
    kv_cache_memory: int | None = None  # bytes of KV pool when num_blocks is None; None: sized (memory.py)
    gpu_memory_utilization: float = 0.9  # share of an accelerator's memory this engine may use
    max_num_seqs: int = 64  # sequences running at once (continuous batch)
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped by the pool
    watermark: float = 0.01  # share of blocks kept free when admitting new prompts
    attention_backend: str = "auto"  # auto, sdpa, flex (services/engine/attention/)
    enforce_eager: bool = False  # no CUDA graphs, no compiled attention kernels (debugging)
    # host memory swapped-out KV may take, per engine (vLLM's `swap_space`); past it, preemption
    # recomputes (0: never swap). A decode stage cannot recompute: it fails the request instead
    swap_space_bytes: int = 4 << 30
    # share the KV of full blocks between prompts with the same prefix (block_manager.py), as vLLM
    # does by default; a decode-only engine never computes prompts and finds nothing to share
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must not be negative, got {self.swap_space_bytes}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
