"""The stages' own figures in their heartbeats: phase histograms and encoder cache counts, checked on
arrival and exported per instance.

A heartbeat's `Load.phases`, `cache_hits` and `cache_misses` come from another process: msgspec
guarantees their types (common/wire.py), not their sense. Before the registry keeps them they are
checked here: known phase names only, one count per bucket of `common.stage_histograms.BUCKETS`,
counts and sums that are non-negative and finite, a few short modality names. A heartbeat whose
figures fail is still a heartbeat (the instance is alive): the registry keeps the figures it had
from that instance, counts the refusal and logs it, so a broken or hostile peer can neither crash a
scrape nor make the gateway hold more than a few hundred numbers per instance.

Exported per instance: `epd_stage_phase_seconds{instance,phase}` (a Prometheus histogram: the
per-bucket counts on the wire become cumulative `le` buckets here, once) and the counters
`epd_encoder_cache_hits_total{instance,modality}` / `epd_encoder_cache_misses_total{...}`.
"""

from __future__ import annotations

import math
import re

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from common.protocol import Load
from common.stage_histograms import BUCKETS, NUM_COUNTS, PHASES, cumulative

MAX_COUNT = 2**53  # past this a count is no longer exact as the float Prometheus holds
MAX_MODALITIES = 8
MODALITY = re.compile(r"[a-z][a-z0-9_]{0,31}")
PHASE_SECONDS = "epd_stage_phase_seconds"
CACHE_HITS = "epd_encoder_cache_hits"
CACHE_MISSES = "epd_encoder_cache_misses"
REFUSED = "epd_stage_figures_refused"
_LE = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]


def figures_problem(load: Load) -> str | None:
    """What is wrong with a heartbeat's phase and cache figures, as a sentence; None when they are fine."""
    phases = load.phases
    if len(phases) > len(PHASES):
        return f"phases: {len(phases)} entries, there are {len(PHASES)} phases"
    for name, snap in phases.items():
        if name not in PHASES:
            return f"phases: unknown phase {name[:40]!r}"
        if len(snap.counts) != NUM_COUNTS:
            return f"phases[{name}]: {len(snap.counts)} counts, expected {NUM_COUNTS}"
        if any(not 0 <= c <= MAX_COUNT for c in snap.counts):
            return f"phases[{name}]: a count is negative or past {MAX_COUNT}"
        if not (math.isfinite(snap.sum) and snap.sum >= 0):
            return f"phases[{name}]: the sum {snap.sum} is not a finite, non-negative number"
    for field, book in (("cache_hits", load.cache_hits), ("cache_misses", load.cache_misses)):
        if len(book) > MAX_MODALITIES:
            return f"{field}: {len(book)} modalities, at most {MAX_MODALITIES}"
        for modality, n in book.items():
            if not MODALITY.fullmatch(modality):
                return f"{field}: modality {modality[:40]!r} is not a short lower-case name"
            if not 0 <= n <= MAX_COUNT:
                return f"{field}[{modality}]: {n} is negative or past {MAX_COUNT}"
    return None


def keep_figures(load: Load, previous: Load) -> None:
    """Replace a refused heartbeat's figures by those the instance sent last (totals since start: the
    series stay where they were instead of dropping out, which would read as a reset)."""
    load.phases, load.cache_hits, load.cache_misses = (
        previous.phases, previous.cache_hits, previous.cache_misses,
    )  # fmt: skip


def families() -> dict[str, HistogramMetricFamily | CounterMetricFamily]:
    return {
        PHASE_SECONDS: HistogramMetricFamily(
            PHASE_SECONDS,
            "Seconds of each phase at a stage instance, timed by the instance itself since it started "
            "(docs/observability.md lists the phases).",
            labels=["instance", "phase"],
        ),
        CACHE_HITS: CounterMetricFamily(
            CACHE_HITS,
            "Items whose features an encoder instance had cached when they came, by modality.",
            labels=["instance", "modality"],
        ),
        CACHE_MISSES: CounterMetricFamily(
            CACHE_MISSES,
            "Items an encoder instance had to encode (not cached when they came), by modality.",
            labels=["instance", "modality"],
        ),
    }


def add(fams: dict, instance_id: str, load: Load) -> None:
    """One instance's figures, as the registry kept them (checked on arrival)."""
    for phase, snap in load.phases.items():
        buckets = list(zip(_LE, cumulative(snap.counts), strict=True))
        fams[PHASE_SECONDS].add_metric([instance_id, phase], buckets=buckets, sum_value=snap.sum)
    for modality, n in load.cache_hits.items():
        fams[CACHE_HITS].add_metric([instance_id, modality], n)
    for modality, n in load.cache_misses.items():
        fams[CACHE_MISSES].add_metric([instance_id, modality], n)


def refused_family(total: int | None) -> CounterMetricFamily:
    """The refusals counted by the registry; None: the family alone (a collector's `describe`)."""
    return CounterMetricFamily(
        REFUSED,
        "Heartbeats whose phase or cache figures the gateway refused (the instance's previous ones kept).",
        value=total,
    )
