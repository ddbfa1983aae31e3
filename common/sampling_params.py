"""Sampling parameters of one request.

A msgspec Struct, so the very object the gateway validates travels to prefill and decode on the wire
unchanged. Seeded sampling is stateless per token (the seed and the token's index pick the random draw),
which is what makes a seeded request give the same tokens in any batch and in any topology: the
sampler of the prefill process draws token 0, the sampler of the decode process token 1 and on, and
neither needs the other's generator state.

The ranges checked here are the wire's and the engine's: msgpack carries at most 64-bit integers, the
sampler holds `top_k` and token ids in int32-sized tensors, and a temperature below `SAMPLING_EPS`
(vLLM's `_SAMPLING_EPS`) is greedy, because dividing logits by it overflows float32 to inf and the
softmax to NaN. The logit processors' ranges are vLLM's (penalties) and OpenAI's (`logit_bias`, 20 top
logprobs); what they do, and in which order, is in `docs/sampling.md`. Token ids are checked against
the vocabulary by the gateway, which knows its size; the engine ignores ids past its logits.
"""

from __future__ import annotations

import math

import msgspec

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit, vLLM's default max_logprobs)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY]
MAX_LOGIT_BIAS = 100.0  # logit_bias values lie in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 0.0  # below SAMPLING_EPS (0 included) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from every token the output already holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides (or multiplies) the logits of prompt and output tokens
    min_tokens: int = 0  # EOS and stop tokens are barred until the output has this many tokens
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    logprobs: int | None = None  # None: none; N: each token's logprob and its top-N alternatives

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
        self._check_processors()

    def _check_processors(self) -> None:
        """The ranges of the options that change the logits before the draw, and of logprobs."""
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for token, bias in self.logit_bias.items():
            if not 0 <= token <= INT32_MAX:
                raise ValueError(f"logit_bias token ids must be in [0, {INT32_MAX}], got {token}")
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(
                    f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}"
                )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalized(self) -> bool:
        """Whether any penalty is set (they need the sequence's prompt and output tokens)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
