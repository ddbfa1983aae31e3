"""OpenAI response objects for the two endpoints, whole and as stream chunks.

Both endpoints stream the same events (text deltas with their tokens' logprobs, a finish reason,
usage); only the JSON around them differs. A `ResponseFormat` knows one endpoint's shapes, so the
streaming code is written once. Logprobs are None when the request did not ask for them, a list of
`TokenLogprob`s (possibly empty) when it did (`gateway.logprobs_format`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.logprobs_format import TokenLogprob, chat_logprobs, completion_logprobs

Entries = list[TokenLogprob] | None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's field)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(slots=True)
class ResponseFormat:
    """The shapes of one endpoint's responses for one request."""

    chunk_object: ClassVar[str] = ""  # the `object` of a stream chunk

    request_id: str
    model: str
    include_usage: bool = False  # stream_options.include_usage: usage on every chunk (null) and at the end
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object, choices)
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunk(self) -> dict[str, Any] | None:
        """A chunk sent before any text (chat: the assistant role), or None."""
        return None

    def delta_chunk(self, text: str, finish_reason: str | None, logprobs: Entries = None) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk when usage was asked for: no choices, only usage."""
        chunk = self._envelope(self.chunk_object, [])
        chunk["usage"] = usage.to_dict()
        return chunk

    def full(self, text: str, finish_reason: str, usage: Usage, logprobs: Entries = None) -> dict[str, Any]:
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    """`chat.completion` and `chat.completion.chunk`."""

    chunk_object = "chat.completion.chunk"

    def first_chunk(self) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def delta_chunk(self, text: str, finish_reason: str | None, logprobs: Entries = None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": chat_logprobs(logprobs),
            "finish_reason": finish_reason,
        }
        return self._chunk([choice])

    def full(self, text: str, finish_reason: str, usage: Usage, logprobs: Entries = None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": chat_logprobs(logprobs),
            "finish_reason": finish_reason,
        }
        body = self._envelope("chat.completion", [choice])
        body["usage"] = usage.to_dict()
        return body


class CompletionFormat(ResponseFormat):
    """`text_completion`, whole and streamed (OpenAI uses the same object name for both)."""

    chunk_object = "text_completion"

    def delta_chunk(self, text: str, finish_reason: str | None, logprobs: Entries = None) -> dict[str, Any]:
        return self._chunk([self._choice(text, finish_reason, logprobs)])

    def full(self, text: str, finish_reason: str, usage: Usage, logprobs: Entries = None) -> dict[str, Any]:
        body = self._envelope("text_completion", [self._choice(text, finish_reason, logprobs)])
        body["usage"] = usage.to_dict()
        return body

    @staticmethod
    def _choice(text: str, finish_reason: str | None, logprobs: Entries) -> dict[str, Any]:
        return {
            "index": 0,
            "text": text,
            "logprobs": completion_logprobs(logprobs),
            "finish_reason": finish_reason,
        }
