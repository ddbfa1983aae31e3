"""A scripted stand-in for the cluster, so the HTTP layer is tested alone.

Tokens are real vocabulary ids (a fixed sentence, tokenized), chosen from the prompt length, so the
text a request gets is predictable (`expected_ids`) and decodes to words. Failures, delays and the end
of a generation are scripted per test; every request, abort and closed event stream is recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.backend import BackendError, GenerateRequest, TokenEvent

SENTENCE = "The quick brown fox jumps over the lazy dog, and the red cat sits on the small table. "


@dataclass
class FakeBackend:
    text_ids: list[int]  # the vocabulary the fake speaks: token ids of SENTENCE
    eos_id: int
    model_name: str = "fake-model"
    max_model_len: int = 4096
    tokens_per_event: int = 1
    token_delay_s: float = 0.0
    fail_before: BackendError | None = None  # raised on the first __anext__
    fail_after: int | None = None  # tokens sent before `fail_with` is raised mid-stream
    fail_with: BackendError = field(default_factory=lambda: BackendError(502, "decode instance d0 died"))
    eos_after: int | None = None  # tokens sent before an EOS token that finishes with "stop"
    healthy: bool = True
    stages: dict = field(default_factory=lambda: {"instances": {"E": 1, "P": 1, "D": 1}})
    extra_metrics: bytes = b"# TYPE fake_backend_up gauge\nfake_backend_up 1\n"
    requests: list[GenerateRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)  # request ids whose event stream was closed

    def expected_ids(self, request: GenerateRequest, count: int) -> list[int]:
        """The first `count` tokens the fake generates for `request`."""
        start = len(request.token_ids) % len(self.text_ids)
        return [self.text_ids[(start + i) % len(self.text_ids)] for i in range(count)]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        try:
            if self.fail_before is not None:
                raise self.fail_before
            total = request.params.max_tokens
            ids = self.expected_ids(request, total)
            if self.eos_after is not None and self.eos_after < total:
                ids = ids[: self.eos_after] + [self.eos_id]
            sent = 0
            while sent < len(ids):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if self.fail_after is not None and sent >= self.fail_after:
                    raise self.fail_with
                chunk = ids[sent : sent + self.tokens_per_event]
                sent += len(chunk)
                if sent < len(ids):
                    yield TokenEvent(chunk)
                else:
                    reason = "stop" if chunk[-1] == self.eos_id and self.eos_after is not None else "length"
                    yield TokenEvent(chunk, finished=True, finish_reason=reason)
        finally:
            self.closed.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)

    def health(self) -> tuple[bool, dict]:
        if not self.healthy:
            return False, {"instances": {"E": 1, "P": 1, "D": 0}}
        return True, self.stages

    def metrics_text(self) -> bytes:
        return self.extra_metrics
