"""Latency histograms a stage process keeps of its own phases, and their form on the wire.

The control messages carry no timestamps, so only the stage itself can say how long an image waited
in its queue or how long a prompt took. Each stage process observes its phases into fixed buckets
(`BUCKETS`, shared by every process and the gateway, so nothing about the buckets travels) and sends
the running totals in each heartbeat (`Load.phases`); the gateway exports them per instance as
Prometheus histograms. Totals since start, like the data-plane counters: a lost heartbeat loses
nothing, and a restarted process starts again from zero (a counter reset, which Prometheus expects).

The phases (`PHASES`; docs/observability.md says where each is measured, from what to what):
  encode_queue   E  an image queued at the encoder -> the encoder batch that takes it starts
  encode         E  one encoder batch: decoding, preprocessing and the encoder call (once per batch)
  feature_wait   P  PREFILL arrived -> every feature of its images is here (requests with images)
  prefill_queue  P  the prompt handed to the engine (features there) -> its first chunk is scheduled
  prefill        P  the step that schedules its first chunk starts -> its first token is sampled
  kv_transfer    D  the first KV byte lands here -> every byte is in and KV_READY has come
  decode_queue   D  the KV in place -> the first decode step that runs the request starts
  decode_step    P (with D) or D  one engine step that decoded at least one request (wall time)

Observing is a dict lookup, a bisection over 17 bounds and two additions under a lock (the I/O
thread reads the totals for the heartbeat while the compute loop observes): well under a
microsecond, nothing next to a forward pass. Torch-free, so the gateway shares it.
"""

from __future__ import annotations

import bisect
import math
import threading

import msgspec

# upper bounds in seconds, from half a millisecond (a decode step of a small model) to a minute (a
# prompt stuck behind a long queue); a last bucket holds what lies above the last bound (+Inf)
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
NUM_COUNTS = len(BUCKETS) + 1  # one count per bucket, the last one for values past BUCKETS[-1]

PHASES: tuple[str, ...] = (
    "encode_queue",
    "encode",
    "feature_wait",
    "prefill_queue",
    "prefill",
    "kv_transfer",
    "decode_queue",
    "decode_step",
)


class PhaseSnapshot(msgspec.Struct, array_like=True):
    """One phase's totals on the wire: observations per bucket (not cumulative: `counts[i]` holds the
    values in (BUCKETS[i-1], BUCKETS[i]], the last one those past BUCKETS[-1]) and their sum."""

    counts: list[int]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


def cumulative(counts: list[int]) -> list[int]:
    """Per-bucket counts -> Prometheus' cumulative `le` form: [observations <= BUCKETS[i]..., all]."""
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out


class PhaseHistograms:
    """The phases one stage process observed since it started; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, phase: str, seconds: float) -> None:
        """Count one duration of `phase` (a name of PHASES); a negative or NaN one counts as 0."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
        if not seconds > 0:  # a step of the clock, or NaN
            seconds = 0.0
        i = bisect.bisect_left(BUCKETS, seconds)  # the first bound >= seconds: Prometheus' `le`
        with self._lock:
            counts = self._counts.get(phase)
            if counts is None:
                counts = self._counts[phase] = [0] * NUM_COUNTS
                self._sums[phase] = 0.0
            counts[i] += 1
            if seconds != math.inf:  # the last bucket holds it; a sum of inf would say nothing more
                self._sums[phase] += seconds

    def snapshot(self) -> dict[str, PhaseSnapshot]:
        """The phases observed at least once, copied: what a heartbeat carries."""
        with self._lock:
            return {p: PhaseSnapshot(list(c), self._sums[p]) for p, c in self._counts.items()}

    def count(self, phase: str) -> int:
        with self._lock:
            return sum(self._counts.get(phase, ()))


def merged(*snapshots: dict[str, PhaseSnapshot]) -> dict[str, PhaseSnapshot]:
    """The sum of several workers' snapshots (the roles of one process), phase by phase."""
    out: dict[str, PhaseSnapshot] = {}
    for snap in snapshots:
        for phase, s in snap.items():
            have = out.get(phase)
            if have is None:
                out[phase] = PhaseSnapshot(list(s.counts), s.sum)
            else:
                have.counts = [a + b for a, b in zip(have.counts, s.counts, strict=True)]
                have.sum += s.sum
    return out


class CacheCounts:
    """Encoder cache lookups by modality ("image"; "video" and others through the same calls), since
    start: a hit is an item whose features were cached when its ENCODE came, a miss one encoded."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def record(self, modality: str, hit: bool) -> None:
        book = self.hits if hit else self.misses
        book[modality] = book.get(modality, 0) + 1
