"""Logprobs as the OpenAI responses show them: token strings from ids, then each endpoint's shape.

The stages send ids and numbers (`common.logprobs.Logprobs`); the gateway turns each id into its
text, as vLLM does: the token decoded alone, special tokens kept (so EOS reads "<|im_end|>"), and
`bytes` the UTF-8 of that text (a token that ends inside a multi-byte character decodes to U+FFFD).
Logprobs below -9999 (and -inf) are shown as -9999.0, OpenAI's value for "very unlikely".

- chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
- completions: `{tokens, token_logprobs, top_logprobs, text_offset}`; each `top_logprobs` entry is a
  dict of the top-N token strings and the chosen token (so up to N+1 entries, as OpenAI documents);
  `text_offset` counts characters of the token strings from the start of the output (vLLM's rule).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from common.logprobs import Logprobs

MIN_LOGPROB = -9999.0


@dataclass(slots=True)
class TokenLogprob:
    """One generated token's logprob and its top alternatives, with their strings."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    text_offset: int = 0  # characters of the token strings before this one in the output


class LogprobTexts:
    """Turns the stages' logprobs into `TokenLogprob`s for one request, counting text offsets."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.offset = 0

    def entries(self, token_ids: list[int], logprobs: Logprobs | None) -> list[TokenLogprob]:
        """One entry per token of `token_ids` that `logprobs` covers (a backend that sent none: [])."""
        if logprobs is None:
            return []
        out = []
        for i, token_id in enumerate(token_ids[: len(logprobs)]):
            text = token_text(self.tokenizer, token_id)
            top = zip(logprobs.top_token_ids[i], logprobs.top_logprobs[i], strict=True)
            alternatives = [(token_text(self.tokenizer, t), _shown(v)) for t, v in top]
            out.append(TokenLogprob(text, _shown(logprobs.token_logprobs[i]), alternatives, self.offset))
            self.offset += len(text)
        return out


@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _shown(value: float) -> float:
    """JSON has no -inf; OpenAI writes -9999.0 for what is that unlikely (NaN too: never a null)."""
    return value if math.isfinite(value) and value > MIN_LOGPROB else MIN_LOGPROB


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """A chat choice's `logprobs` (None when the request did not ask for them)."""
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _utf8(e.token),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": _utf8(t)} for t, v in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """A completion choice's `logprobs` (None when the request did not ask for them)."""
    if entries is None:
        return None
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{**dict(e.top), e.token: e.logprob} for e in entries],
        "text_offset": [e.text_offset for e in entries],
    }
