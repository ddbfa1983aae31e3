"""Every generation request counted and logged exactly once, whatever the client does and whatever fails.

A request can end in many places: refused by validation, failed in preprocessing or at a stage, or
cancelled at any `await` because its client closed the connection (before the first byte, mid-stream,
or right after `[DONE]` while the request is being released). `accounted()` wraps the whole handler:
the handler fills in the `Outcome` as it learns it, and the accounting runs from a `finally` without
awaiting anything, so no cancellation can skip it. It also releases the request's generation (a no-op
when the handler already did), so the running gauge and the backend's state always come back.

    with accounted(metrics, "chat") as outcome:
        ...                             # outcome.status = 200; outcome.generation = generation
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from gateway.metrics import GatewayMetrics
from gateway.streaming import CLIENT_GONE, Generation

log = structlog.get_logger("gateway")


@dataclass(slots=True)
class Outcome:
    """What a request's count and its one "request done" line say."""

    endpoint: str
    arrival: float = field(default_factory=time.monotonic)
    status: int = CLIENT_GONE  # until known: a handler cancelled because its client went away
    error: str | None = None  # why it was refused
    generation: Generation | None = None  # once it was admitted


@contextmanager
def accounted(metrics: GatewayMetrics, endpoint: str) -> Iterator[Outcome]:
    """The outcome to fill in; counted and logged when the block ends, however it ends."""
    outcome = Outcome(endpoint)
    try:
        yield outcome
    except web.HTTPException as exc:
        outcome.status = exc.status
        raise
    except ConnectionError:  # the client went away while its body was read: stays CLIENT_GONE
        raise
    except Exception:
        outcome.status = 500  # the app's error middleware answers, and logs it
        raise
    finally:
        account(metrics, outcome)


def account(metrics: GatewayMetrics, outcome: Outcome) -> None:
    """Count the request, release its generation if a path missed it, and log its one line."""
    metrics.record_request(outcome.endpoint, outcome.status)
    fields: dict[str, Any] = {"endpoint": outcome.endpoint, "status": outcome.status}
    if outcome.error is not None:
        fields["error"] = outcome.error
    generation = outcome.generation
    if generation is not None:
        generation.release()
        usage = generation.usage
        fields.update(
            finish_reason=generation.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            images=len(generation.request.images),
        )
    log.info("request done", **fields, seconds=round(time.monotonic() - outcome.arrival, 4))
