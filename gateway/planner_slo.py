"""The SLO as clients lived it over the last seconds: the planner's targets and its evidence.

The gateway records every finished request (its TTFT, and its TPOT when it had a second token) and
the planner reads the share that met both SLOs over a sliding window, and the percentiles, for its
decision lines. The SLO values themselves (default TTFT 2 s, TPOT 50 ms, as in DESIGN.md and the
reference paper) are also what the pressures are measured against (gateway/planner_signals.py).

Time is passed in (`now`, time.monotonic() seconds), so tests step it by hand. Memory is bounded:
past `max_requests` the oldest requests are dropped even if still inside the window.
"""

from __future__ import annotations

import math
from collections import deque


class SloWindow:
    def __init__(
        self, window_s: float = 30.0, ttft_s: float = 2.0, tpot_s: float = 0.05, max_requests: int = 100_000
    ) -> None:
        for name, value in (("window_s", window_s), ("ttft_s", ttft_s), ("tpot_s", tpot_s)):
            if not value > 0:
                raise ValueError(f"SLO {name} must be positive, got {value}")
        if max_requests < 1:
            raise ValueError(f"SLO max_requests must be at least 1, got {max_requests}")
        self.window_s = window_s
        self.ttft_s = ttft_s
        self.tpot_s = tpot_s
        self._done: deque[tuple[float, float, float | None]] = deque(maxlen=max_requests)

    def record(self, ttft_s: float, tpot_s: float | None, now: float) -> None:
        """One finished request; `tpot_s` None when it had a single token (nothing to time)."""
        self._done.append((now, ttft_s, tpot_s))

    def _recent(self, now: float) -> deque[tuple[float, float, float | None]]:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()
        return self._done

    def count(self, now: float) -> int:
        return len(self._recent(now))

    def attainment(self, now: float) -> float | None:
        """The share of the window's requests that met both SLOs; None when there were none."""
        done = self._recent(now)
        if not done:
            return None
        met = sum(
            1 for _, ttft, tpot in done if ttft <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)
        )
        return met / len(done)

    def ttft_percentile(self, q: float, now: float) -> float | None:
        """The q-th percentile (0..100, nearest rank) of the window's TTFTs; None when empty."""
        return _percentile([ttft for _, ttft, _ in self._recent(now)], q)

    def tpot_percentile(self, q: float, now: float) -> float | None:
        return _percentile([tpot for _, _, tpot in self._recent(now) if tpot is not None], q)


def _percentile(values: list[float], q: float) -> float | None:
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    if not values:
        return None
    values.sort()
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[rank - 1]
