"""The sampling options that change the logits or ask for logprobs: checked, as SamplingParams fields.

Ranges are vLLM's (`SamplingParams._verify_args`) and OpenAI's, each refusal a 400 naming the field:

- `presence_penalty`, `frequency_penalty`: [-2, 2]; `repetition_penalty` (vLLM extension): > 0.
- `min_tokens` (vLLM extension): 0 to max_tokens.
- `logit_bias`: keys are token ids written as strings (JSON object keys), each in [0, vocab size);
  values in [-100, 100]. OpenAI refuses values outside that range and so does this server (vLLM
  clamps them instead).
- chat: `logprobs` (bool) and `top_logprobs` 0 to 20, which needs `logprobs: true` (as OpenAI and
  vLLM); completions: `logprobs` an integer 0 to 5, the number of top alternatives per token.

What each option does in the engine, and what the logprobs are, is in `docs/sampling.md`.
"""

from __future__ import annotations

import math
from typing import Any

from common.sampling_params import INT32_MAX, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY
from gateway.errors import bad_request
from gateway.request_limits import check_int_range

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions endpoint


def processor_fields(
    request: Any, vocab_size: int | None, defaults: dict[str, Any], max_tokens: int | None
) -> dict[str, Any]:
    """The SamplingParams fields of the logit processors and logprobs; `max_tokens` is the request's
    own, if it set one (min_tokens is checked against the final one in `check_min_tokens` too)."""
    return {
        "presence_penalty": _penalty(request.presence_penalty, "presence_penalty"),
        "frequency_penalty": _penalty(request.frequency_penalty, "frequency_penalty"),
        "repetition_penalty": _repetition_penalty(request, defaults),
        "min_tokens": check_min_tokens(request.min_tokens or 0, max_tokens),
        "logit_bias": _logit_bias(request.logit_bias or {}, vocab_size),
        "logprobs": _logprobs(request),
    }


def _penalty(value: float | None, name: str) -> float:
    value = 0.0 if value is None else float(value)
    if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
        raise bad_request(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}", param=name)
    return value


def _repetition_penalty(request: Any, defaults: dict[str, Any]) -> float:
    value = request.repetition_penalty
    value = float(defaults.get("repetition_penalty", 1.0) if value is None else value)
    if not (math.isfinite(value) and value > 0):
        raise bad_request(
            f"repetition_penalty must be a finite number > 0, got {value} (1 means no penalty)",
            param="repetition_penalty",
        )
    return value


def check_min_tokens(min_tokens: int, max_tokens: int | None) -> int:
    """min_tokens within [0, max_tokens] (vLLM's rule), or within int32 while max_tokens is unknown."""
    check_int_range(min_tokens, "min_tokens", 0, INT32_MAX)
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be at most max_tokens ({max_tokens}), got {min_tokens}", param="min_tokens"
        )
    return min_tokens


def _logit_bias(bias: dict[str, float], vocab_size: int | None) -> dict[int, float]:
    end = INT32_MAX + 1 if vocab_size is None else min(vocab_size, INT32_MAX + 1)
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = _token_id(key)
        if token is None or not 0 <= token < end:
            raise bad_request(
                f"logit_bias keys must be token ids in [0, {end}) written as strings, got {key[:40]!r}",
                param="logit_bias",
            )
        if not (math.isfinite(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise bad_request(
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {value} for token {token}",
                param="logit_bias",
            )
        out[token] = float(value)
    return out


def _token_id(key: str) -> int | None:
    """A decimal integer key ("42"), nothing looser (no spaces, signs or underscores Python allows)."""
    digits = key[1:] if key.startswith("-") else key
    return int(key) if digits.isascii() and digits.isdigit() and len(digits) <= 12 else None


def _logprobs(request: Any) -> int | None:
    """How many top alternatives per token the response shows (None: no logprobs at all)."""
    if hasattr(request, "messages"):
        top = request.top_logprobs
        if top is not None:
            check_int_range(top, "top_logprobs", 0, MAX_LOGPROBS)
        if top and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        return (top or 0) if request.logprobs else None
    value = request.logprobs
    if value is None or value is False:
        return None
    if value is True:
        raise bad_request(
            f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS} for completions "
            "(the number of top alternatives per token), got true",
            param="logprobs",
        )
    check_int_range(value, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return value
