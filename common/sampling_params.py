"""Sampling parameters of one request.

A msgspec Struct, so the very object the gateway validates travels to prefill and decode on the wire
unchanged. Seeded sampling is stateless per token (the seed and the token's index pick the random draw),
which is what makes a seeded request give the same tokens in any batch and in any topology: the
sampler of the prefill process draws token 0, the sampler of the decode process token 1 and on, and
neither needs the other's generator state.

The ranges checked here are the wire's and the engine's: msgpack carries at most 64-bit integers, the
sampler holds `top_k` and token ids in int32-sized tensors, and a temperature below `SAMPLING_EPS`
(vLLM's `_SAMPLING_EPS`) is greedy, because dividing logits by it overflows float32 to inf and the
softmax to NaN.
"""

from __future__ import annotations

import math

import msgspec

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 0.0  # below SAMPLING_EPS (0 included) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be between 1 and {INT32_MAX}, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= INT32_MAX:
            raise ValueError(f"top_k must be between 0 (no cut) and {INT32_MAX}, got {self.top_k}")
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX:
            raise ValueError(f"seed must fit in a signed 64-bit integer, got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {INT32_MAX}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS
