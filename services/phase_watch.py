"""How long requests wait in an engine's queue before a step first runs them.

The engine says nothing about when it schedules a sequence, and a hook inside the scheduler would tie
it to the metrics. The workers know when they hand a request to the engine and when each step begins;
after a step, a sequence that is no longer queued (WAITING for its prompt, REMOTE with its KV just
arrived) was scheduled by that step, so its wait ended when the step began. Only the requests not yet
scheduled are looked at, one dict lookup each per step.
"""

from __future__ import annotations

import time
from typing import Any

from common.stage_histograms import PhaseHistograms
from services.engine.sequence import SequenceStatus

_QUEUED = (SequenceStatus.WAITING, SequenceStatus.REMOTE)


class ScheduleWatch:
    """Requests handed to an engine and not yet scheduled; their waits go into `phase`."""

    def __init__(self, scheduler: Any, phases: PhaseHistograms, phase: str) -> None:
        self._requests = scheduler.requests  # request id -> Sequence, while the engine holds it
        self._phases = phases
        self._phase = phase
        self._since: dict[str, float] = {}  # request id -> time.perf_counter() when handed over

    def queued(self, request_id: str) -> None:
        """The request is in the engine now."""
        self._since[request_id] = time.perf_counter()

    def drop(self, request_id: str) -> None:
        """It left before any step ran it (aborted, failed)."""
        self._since.pop(request_id, None)

    def scheduled(self, began: float) -> list[str]:
        """After a step that began at `began` (time.perf_counter()): the requests it ran first, each
        one's wait observed. One that is gone from the engine was run and finished by this step: an
        abort or a failed step drops its requests here before this is called."""
        out = []
        for rid, since in list(self._since.items()):
            seq = self._requests.get(rid)
            if seq is not None and seq.status in _QUEUED:
                continue
            del self._since[rid]
            self._phases.observe(self._phase, began - since)
            out.append(rid)
        return out

    def __len__(self) -> int:
        return len(self._since)
