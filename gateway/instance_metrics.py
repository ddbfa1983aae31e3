"""The cluster's figures for /metrics: per instance from its heartbeats, per stage from what the gateway
can time.

Per instance: what each instance reported in its last heartbeat (queue, running requests, KV blocks,
data-plane totals by backend, its own phase histograms and encoder cache counts: stage_figures.py)
and the requests the gateway has placed there and not yet seen leave. They are read from the
registry when /metrics is scraped, by a custom prometheus_client collector, so instance ids (which
operators choose) are escaped by the library and the metric names and types are checked by it.

Per stage, end to end: the control-plane messages carry no timestamps, so the gateway also times
what it sees itself: dispatch (KV_RESERVE, ENCODE, PREFILL sent) to FIRST_TOKEN, and FIRST_TOKEN to
the first TOKENS from decode (`StageTimings`); the stages time their own phases. docs/observability.md
lists what is there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import stage_figures
from gateway.metrics import LATENCY_BUCKETS
from gateway.registry import Instance, Registry

log = logging.getLogger("epd.gateway.metrics")

Figure = Callable[[Instance], float]

# (metric, help, value) for every instance; the counters get their `_total` from prometheus_client
# and a `backend` label (the instance's data plane)
INSTANCE_GAUGES: list[tuple[str, str, Figure]] = [
    ("epd_stage_running", "Requests running at an instance (last heartbeat).", lambda i: i.load.running),
    (
        "epd_stage_inflight_requests",
        "Requests the gateway placed at an instance and has not yet seen leave it.",
        lambda i: len(i.inflight),
    ),
    (
        "epd_kv_free_blocks",
        "Free blocks of an instance's KV pool (last heartbeat).",
        lambda i: i.load.free_kv_blocks,
    ),
    ("epd_kv_total_blocks", "Blocks of an instance's KV pool.", lambda i: i.load.total_kv_blocks),
    (
        "epd_instance_suspect",
        "1 while an instance's heartbeats are late (it gets no new work), else 0.",
        lambda i: float(i.suspect),
    ),
]
INSTANCE_COUNTERS: list[tuple[str, str, Figure]] = [
    (
        "epd_transfer_bytes",
        "Data-plane bytes moved by an instance (sent + received).",
        lambda i: i.load.transfer_bytes,
    ),
    ("epd_transfer_seconds", "Data-plane seconds spent by an instance.", lambda i: i.load.transfer_seconds),
]
QUEUE_DEPTH = "epd_stage_queue_depth"


class InstanceCollector(Collector):
    """Per-instance figures, read from the registry at each scrape."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def describe(self) -> Iterable[Metric]:
        """The families without samples, so registering this collector does not read the registry."""
        return [*_families().values(), stage_figures.refused_family(None)]

    def collect(self) -> Iterable[Metric]:
        """Every instance's figures; on a failure none of them (logged), never a broken /metrics."""
        families = _families()
        try:
            for inst in list(self._registry.instances.values()):
                _add(families, inst)
        except Exception:
            log.exception("collecting the per-instance metrics failed")
            return []
        return [*families.values(), stage_figures.refused_family(self._registry.figures_refused)]


def _families() -> dict[str, Metric]:
    families: dict[str, Metric] = {
        QUEUE_DEPTH: GaugeMetricFamily(
            QUEUE_DEPTH,
            "Requests queued at a stage instance (last heartbeat).",
            labels=["stage", "instance"],
        )
    }
    for name, help_, _ in INSTANCE_GAUGES:
        families[name] = GaugeMetricFamily(name, help_, labels=["instance"])
    for name, help_, _ in INSTANCE_COUNTERS:
        families[name] = CounterMetricFamily(name, help_, labels=["instance", "backend"])
    families.update(stage_figures.families())
    return families


def _add(families: dict[str, Metric], inst: Instance) -> None:
    for role in inst.info.roles:
        depth = inst.load.encode_queue if role == "E" else inst.load.waiting
        families[QUEUE_DEPTH].add_metric([role, inst.id], depth)
    for name, _, figure in INSTANCE_GAUGES:
        families[name].add_metric([inst.id], figure(inst))
    backend = backend_of(inst)
    for name, _, figure in INSTANCE_COUNTERS:
        families[name].add_metric([inst.id, backend], figure(inst))
    stage_figures.add(families, inst.id, inst.load)


def backend_of(inst: Instance) -> str:
    """The data-plane backend an instance registered with ("shm", "tcp", ...; "" when it named none)."""
    backend = inst.info.dataplane.get("backend")
    return backend if isinstance(backend, str) and len(backend) <= 64 else ""


@dataclass(slots=True)
class StageClock:
    """One request's way through the stages as the gateway sees it (time.monotonic() values)."""

    split: bool = False  # decode on another instance than prefill
    with_images: bool = False
    dispatched_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    decode_timed: bool = False


class StageTimings:
    """What the gateway can time of a request's way through the stages, from its own clock."""

    def __init__(self) -> None:
        # not in any registry yet: the owner registers `collectors()` where it exposes them
        self.first_token_seconds = Histogram(
            "epd_stage_dispatch_to_first_token_seconds",
            "The gateway sending a request to its stages to the prefill instance's first token: queueing "
            "and encode (requests with images), feature transfer, prefill.",
            ["images"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.decode_start_seconds = Histogram(
            "epd_stage_first_token_to_decode_seconds",
            "The first token (prefill) to the first tokens from decode: KV transfer and decode admission "
            "(placement=split), or one decode step (placement=colocated).",
            ["placement"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )

    def collectors(self) -> list[Collector]:
        return [self.first_token_seconds, self.decode_start_seconds]

    def first_token(self, clock: StageClock) -> None:
        """FIRST_TOKEN arrived: observe the time since dispatch, once."""
        if clock.first_token_at is not None:
            return
        clock.first_token_at = time.monotonic()
        images = "yes" if clock.with_images else "no"
        self.first_token_seconds.labels(images=images).observe(clock.first_token_at - clock.dispatched_at)

    def decode_tokens(self, clock: StageClock) -> None:
        """TOKENS arrived: the first ones after the first token are the decode figure."""
        if clock.first_token_at is None or clock.decode_timed:
            return
        clock.decode_timed = True
        placement = "split" if clock.split else "colocated"
        self.decode_start_seconds.labels(placement=placement).observe(time.monotonic() - clock.first_token_at)
