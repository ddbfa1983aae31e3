"""The load-shift benchmark's schedule, per-phase figures and comparison, on hand-made records."""

from __future__ import annotations

import pytest

from bench.load_shift import Phase, build_parser, compare, format_table, phase_summaries, schedule
from bench.serve.client import RequestRecord
from bench.serve.metrics import Slo

PHASES = [
    Phase("images", seconds=10.0, rate=4.0, images=2, output_len=8, prompt_len=8),
    Phase("text", seconds=10.0, rate=2.0, images=0, output_len=32, prompt_len=8),
]


def test_the_schedule_follows_each_phase_and_is_the_same_for_the_same_seed():
    arrivals = schedule(PHASES, seed=3)
    assert [a.request.index for a in arrivals] == list(range(len(arrivals)))  # unique across phases
    assert [a.at for a in arrivals] == sorted(a.at for a in arrivals)
    for a in arrivals:
        phase = PHASES[a.phase]
        start = sum(p.seconds for p in PHASES[: a.phase])
        assert start <= a.at < start + phase.seconds
        assert len(a.request.images) == phase.images and a.request.output_len == phase.output_len
    counts = [sum(1 for a in arrivals if a.phase == k) for k in range(2)]
    assert 20 <= counts[0] <= 60 and 5 <= counts[1] <= 40  # Poisson around 40 and 20
    again = schedule(PHASES, seed=3)
    assert [(a.at, a.request.prompt) for a in again] == [(a.at, a.request.prompt) for a in arrivals]
    assert [a.at for a in schedule(PHASES, seed=4)] != [a.at for a in arrivals]


def _record(index: int, ttft: float, out: int = 4, tpot: float = 0.01, ok: bool = True) -> RequestRecord:
    start = float(index)
    chunks = [start + ttft + k * tpot for k in range(out)]
    return RequestRecord(
        index=index, start=start, end=chunks[-1], chunk_times=chunks, output_tokens=out, success=ok,
        error="" if ok else "HTTP 503: gone",
    )  # fmt: skip


def test_goodput_is_counted_per_phase_over_its_length_and_over_the_whole_run():
    arrivals = schedule(PHASES, seed=0)
    slo = Slo(ttft_ms=1000.0, tpot_ms=50.0)
    records = []
    for a in arrivals:  # phase 0: every third request late; phase 1: all in time, one failed
        late = a.phase == 0 and a.request.index % 3 == 0
        failed = a.phase == 1 and a.request.index == arrivals[-1].request.index
        records.append(_record(a.request.index, 2.0 if late else 0.1, ok=not failed))
    out = phase_summaries(arrivals, records, PHASES, duration=25.0, slo=slo)
    first = [a for a in arrivals if a.phase == 0]
    good0 = sum(1 for a in first if a.request.index % 3)
    assert out["phases"][0]["slo_met"] == good0
    assert out["phases"][0]["goodput"] == pytest.approx(good0 / 10.0)
    second = [a for a in arrivals if a.phase == 1]
    assert out["phases"][1]["slo_met"] == len(second) - 1 and out["phases"][1]["failed"] == 1
    assert out["whole"]["goodput"] == pytest.approx((good0 + len(second) - 1) / 25.0)


def _result(system: str, planner: str, phases: list[float], whole: float) -> dict:
    return {
        "system": system, "planner": planner, "role_changes": 0,
        "phases": [{"goodput": g, "slo_attainment": 1.0} for g in phases],
        "whole": {"goodput": whole, "slo_attainment": 1.0, "failed": 0},
    }  # fmt: skip


def test_the_comparison_names_the_best_fixed_and_the_first_phase_best():
    results = [
        _result("fixed A", "off", [3.0, 0.5], 1.5),  # best in phase one
        _result("fixed B", "off", [2.0, 1.5], 1.8),  # best over the run
        _result("planner", "on", [2.9, 1.4], 2.0),
    ]
    out = compare(results)
    assert out["best_fixed"] == "fixed B" and out["first_phase_best_fixed"] == "fixed A"
    assert out["planner_vs_best_fixed"] == pytest.approx(2.0 / 1.8)
    assert out["planner_vs_first_phase_best"] == pytest.approx(2.0 / 1.5)
    table = format_table(results, PHASES)
    assert "| planner | 2.90 (100%) | 1.40 (100%) | **2.00** (100%) | 0 | 0 |" in table


def test_the_defaults_shift_from_images_to_long_text_and_back():
    from bench.load_shift import phases_of

    phases = phases_of(build_parser().parse_args([]))
    assert [p.images for p in phases] == [1, 0, 1]
    assert phases[1].output_len > 8 * phases[0].output_len
