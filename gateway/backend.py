"""The boundary between the HTTP layer and the stage services.

The HTTP layer (validation, chat templates, images, streaming, metrics) only ever talks to a `Backend`;
the cluster client that routes requests to encode, prefill and decode instances implements it. Keeping
the boundary this small lets each side be tested alone: the HTTP tests run against a fake backend, the
cluster against fake stages.

Contract, as the HTTP layer uses it:

- `generate(request)` is iterated with `async for`-style `__anext__` calls. It may be an async generator
  (`async def generate(...): ... yield event`) or return an async iterator (or an awaitable of one).
- It raises `BackendError` on the first `__anext__` when the request cannot be placed (503: no live
  decode instance, ...), and may raise it on any later `__anext__` when a stage fails mid-request
  (502/503, message for the client). The error's status goes to the client: as the HTTP status before
  any byte was sent, inside an SSE error event after.
- Every event carries the new token ids (possibly none) and, when the request's `params.logprobs` is
  set, their logprobs (one entry per token id). The last one has `finished=True` and a
  `finish_reason`; the HTTP layer stops iterating there and calls `aclose()` on the iterator, so
  cleanup belongs in `finally`.
- `abort(request_id)` is called, once, for every request whose iteration did not end with a
  `finished=True` event: a stop string reached by the gateway's detokenizer, a client that went away,
  the request deadline, and also after `generate` raised (before or after the first event). It must be
  idempotent and accept ids it no longer (or never) knew. It runs in its own task, so it is not
  interrupted when the client's handler is cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from common.logprobs import Logprobs
from common.protocol import VideoSettings
from common.sampling_params import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(slots=True)
class ImageInput:
    """One validated image, video or audio clip of a request, in prompt order (`kind` says which)."""

    hash: str  # the embedding-cache key: content_hash(data); a video's covers its settings too
    data: bytes  # the encoded image (PNG, JPEG, ...), video (MP4, ...) or audio exactly as received
    width: int  # pixels, after the EXIF orientation (a video: its display rotation) is applied; audio 0
    height: int
    # the patch grid the encoder will make (VisionGeometry.grid, video_plan); audio: (1, 1, num_tokens)
    grid_thw: tuple[int, int, int]
    num_tokens: int  # placeholder tokens it takes in `token_ids`
    kind: str = "image"  # "image", "video" or "audio"
    second_per_grid_t: float = 0.0  # a video's seconds per temporal patch (Qwen2.5-VL's M-RoPE)
    video: VideoSettings | None = None  # the sampling a video was planned with, for the encoder
    max_seconds: float = 0.0  # audio: the duration it was decoded (and counted) within
    timestamps: tuple[float, ...] = ()  # Qwen3-VL video: seconds per temporal patch, for the prompt


@dataclass(slots=True)
class GenerateRequest:
    request_id: str  # "chatcmpl-<hex>" or "cmpl-<hex>", unique per request
    token_ids: list[int]  # the prompt, every image placeholder already expanded to its num_tokens copies
    images: list[ImageInput]  # images and videos, in prompt order
    params: SamplingParams  # max_tokens already fits in max_model_len


@dataclass(slots=True)
class TokenEvent:
    token_ids: list[int]  # new tokens since the previous event (EOS included if sampled; it is counted)
    finished: bool = False
    finish_reason: str | None = None  # with finished: "stop" (EOS / stop token) | "length" | "abort"
    logprobs: Logprobs | None = None  # of token_ids, in order, when the request asked for logprobs
    num_cached_tokens: int = 0  # with the first token: prompt tokens served from the prefix cache


class BackendError(Exception):
    """A request the stages could not serve; `status` is the HTTP status to report (502, 503, 504...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"BackendError({self.status}, {self.message!r})"


@runtime_checkable
class Backend(Protocol):
    """What the HTTP layer needs from the cluster of stage services."""

    model_name: str  # the model the stages serve (shown in /health)
    max_model_len: int  # context length: prompt plus generated tokens never exceed it

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Run one request; see the module docstring for when it raises and when it ends."""
        ...

    async def abort(self, request_id: str) -> None:
        """Free the request everywhere (client gone, stop string reached, deadline); idempotent."""
        ...

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(False when some stage has no live instance, details such as live instances per stage)."""
        ...

    def metrics_text(self) -> bytes:
        """Extra Prometheus text exposition appended to /metrics; b"" when there is none."""
        ...
