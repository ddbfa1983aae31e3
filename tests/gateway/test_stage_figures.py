"""The stages' phase histograms and cache counts at the gateway: checked before the registry keeps
them (a bad heartbeat keeps the instance alive and its previous figures, and is counted), and
exported per instance as Prometheus histograms and counters."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.protocol import InstanceInfo, Load
from common.stage_histograms import BUCKETS, NUM_COUNTS, PHASES, PhaseHistograms, PhaseSnapshot
from gateway.instance_metrics import InstanceCollector
from gateway.registry import Registry
from gateway.stage_figures import MAX_MODALITIES, figures_problem


def registry_with(*instances: tuple[str, str, str]) -> Registry:
    reg = Registry("m")
    for instance_id, roles, backend in instances:
        info = InstanceInfo(
            instance_id=instance_id, roles=roles, address="tcp://127.0.0.1:1", model="m",
            dataplane={"backend": backend},
        )  # fmt: skip
        assert reg.admit(info) == (None, None)
    return reg


def good_load(**extra: Any) -> Load:
    h = PhaseHistograms()
    h.observe("encode", 0.004)
    h.observe("encode", 0.3)
    h.observe("encode_queue", 0.0001)
    return Load(phases=h.snapshot(), cache_hits={"image": 3}, cache_misses={"image": 1}, **extra)


def snap(counts: list[int] | None = None, total: float = 1.0) -> PhaseSnapshot:
    return PhaseSnapshot([1] + [0] * (NUM_COUNTS - 1) if counts is None else counts, total)


BAD = {
    "unknown phase": Load(phases={"lunch": snap()}),
    "too few counts": Load(phases={"encode": snap([1, 2])}),
    "too many counts": Load(phases={"encode": snap([0] * (NUM_COUNTS + 1))}),
    "negative count": Load(phases={"encode": snap([-1] + [0] * (NUM_COUNTS - 1))}),
    "huge count": Load(phases={"encode": snap([2**60] + [0] * (NUM_COUNTS - 1))}),
    "NaN sum": Load(phases={"encode": snap(total=math.nan)}),
    "infinite sum": Load(phases={"encode": snap(total=math.inf)}),
    "negative sum": Load(phases={"encode": snap(total=-1.0)}),
    "too many phases": Load(phases={f"p{i}": snap() for i in range(len(PHASES) + 1)}),
    "too many modalities": Load(cache_hits={f"m{i}": 1 for i in range(MAX_MODALITIES + 1)}),
    "odd modality": Load(cache_misses={'image"}\n': 1}),
    "empty modality": Load(cache_misses={"": 1}),
    "negative hits": Load(cache_hits={"image": -5}),
}


def test_good_figures_pass() -> None:
    assert figures_problem(good_load()) is None
    assert figures_problem(Load()) is None


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_figures_are_named(case: str) -> None:
    assert figures_problem(BAD[case]) is not None


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_heartbeat_keeps_the_instance_and_its_previous_figures(case: str, caplog) -> None:
    reg = registry_with(("e0", "E", "shm"))
    first = good_load()
    assert reg.heartbeat("e0", first)
    bad = msgspec.structs.replace(BAD[case], waiting=7)  # a copy: the registry rewrites what it refuses
    assert reg.heartbeat("e0", bad), "still a heartbeat: the instance is alive"
    kept = reg.instances["e0"].load
    assert kept.waiting == 7, "the rest of the load is taken"
    assert (kept.phases, kept.cache_hits, kept.cache_misses) == (
        first.phases, first.cache_hits, first.cache_misses,
    )  # fmt: skip
    assert reg.figures_refused == 1
    assert "refused the figures" in caplog.text


def scrape(reg: Registry) -> dict[str, Any]:
    prom = CollectorRegistry()
    prom.register(InstanceCollector(reg))
    return {f.name: f for f in text_string_to_metric_families(generate_latest(prom).decode())}


def by_name(family: Any, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_phase_histograms_are_exported_cumulatively_per_instance() -> None:
    reg = registry_with(("e0", "E", "shm"), ('p "1"', "P", "tcp"))
    assert reg.heartbeat("e0", good_load())
    prefill = PhaseHistograms()
    for s in (0.02, 0.02, 7.0):
        prefill.observe("prefill", s)
    assert reg.heartbeat('p "1"', Load(phases=prefill.snapshot()))
    families = scrape(reg)
    phases = families["epd_stage_phase_seconds"]
    assert phases.type == "histogram"
    counts = by_name(phases, "epd_stage_phase_seconds_count")
    assert counts == {
        (("instance", "e0"), ("phase", "encode")): 2,
        (("instance", "e0"), ("phase", "encode_queue")): 1,
        (("instance", 'p "1"'), ("phase", "prefill")): 3,
    }
    sums = by_name(phases, "epd_stage_phase_seconds_sum")
    assert sums[(("instance", 'p "1"'), ("phase", "prefill"))] == pytest.approx(7.04)
    buckets = {
        float(s.labels["le"]): s.value
        for s in phases.samples
        if s.name.endswith("_bucket") and s.labels["phase"] == "prefill"
    }
    assert len(buckets) == len(BUCKETS) + 1 and buckets[math.inf] == 3
    assert buckets[0.01] == 0 and buckets[0.025] == 2 and buckets[5.0] == 2 and buckets[10.0] == 3
    values = [buckets[b] for b in sorted(buckets)]
    assert values == sorted(values), "cumulative"


def test_cache_counters_and_transfer_counters_by_backend() -> None:
    reg = registry_with(("e0", "E", "shm"), ("d0", "D", "tcp"))
    assert reg.heartbeat("e0", good_load(transfer_bytes=100, transfer_seconds=0.25))
    assert reg.heartbeat("d0", Load(transfer_bytes=5))
    families = scrape(reg)
    assert families["epd_encoder_cache_hits"].type == "counter"
    assert by_name(families["epd_encoder_cache_hits"], "epd_encoder_cache_hits_total") == {
        (("instance", "e0"), ("modality", "image")): 3
    }
    assert by_name(families["epd_encoder_cache_misses"], "epd_encoder_cache_misses_total") == {
        (("instance", "e0"), ("modality", "image")): 1
    }
    assert by_name(families["epd_transfer_bytes"], "epd_transfer_bytes_total") == {
        (("backend", "shm"), ("instance", "e0")): 100,
        (("backend", "tcp"), ("instance", "d0")): 5,
    }
    assert by_name(families["epd_transfer_seconds"], "epd_transfer_seconds_total")[
        (("backend", "shm"), ("instance", "e0"))
    ] == pytest.approx(0.25)


def test_the_refusals_are_a_counter_and_an_odd_backend_is_no_label() -> None:
    reg = registry_with(("e0", "E", "x" * 500))
    assert reg.heartbeat("e0", msgspec.structs.replace(BAD["negative hits"]))
    families = scrape(reg)
    assert by_name(families["epd_stage_figures_refused"], "epd_stage_figures_refused_total") == {(): 1}
    assert by_name(families["epd_transfer_bytes"], "epd_transfer_bytes_total") == {
        (("backend", ""), ("instance", "e0")): 0
    }
    assert by_name(families["epd_encoder_cache_hits"], "epd_encoder_cache_hits_total") == {}
