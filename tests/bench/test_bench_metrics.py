"""The metric math of `epd-serve bench` on hand-made request timelines, where every number is known."""

from __future__ import annotations

import math

import pytest

from bench.serve.client import RequestRecord
from bench.serve.metrics import Slo, details, distribution, summarize
from bench.serve.report import add_ratios, format_tables


def record(
    index: int, start: float, chunks: list[float], end: float, out: int, prompt: int = 10
) -> RequestRecord:
    return RequestRecord(
        index=index, start=start, end=end, chunk_times=chunks, prompt_tokens=prompt, output_tokens=out,
        success=True,
    )  # fmt: skip


def failed(index: int, message: str = "HTTP 503: no decode instance") -> RequestRecord:
    return RequestRecord(index=index, start=0.0, end=0.5, error=message)


def test_per_request_ttft_tpot_itl_e2e():
    r = record(0, start=1.0, chunks=[1.2, 1.25, 1.4], end=1.5, out=5)
    assert r.ttft == pytest.approx(0.2)
    assert r.e2e == pytest.approx(0.5)
    assert r.tpot == pytest.approx((0.5 - 0.2) / 4)  # (e2e - ttft) / (output_tokens - 1)
    assert r.itls == pytest.approx([0.05, 0.15])
    one = record(1, start=0.0, chunks=[0.3], end=0.3, out=1)
    assert one.tpot is None and one.itls == []


def test_ttft_falls_back_to_the_first_choice_when_no_chunk_had_text():
    r = RequestRecord(index=0, start=2.0, end=3.0, first_choice_time=2.25, output_tokens=3, success=True)
    assert r.ttft == pytest.approx(0.25)


def test_distribution_keys_and_values():
    d = distribution("ttft", [0.1, 0.2, 0.3, 0.4])
    assert d["mean_ttft_ms"] == pytest.approx(250.0)
    assert d["median_ttft_ms"] == pytest.approx(250.0)
    assert d["std_ttft_ms"] == pytest.approx(math.sqrt(0.0125) * 1e3)
    assert d["p90_ttft_ms"] == pytest.approx(370.0)  # linear interpolation, as numpy (and vLLM)
    assert d["p99_ttft_ms"] == pytest.approx(397.0)
    assert all(v is None for v in distribution("itl", []).values())


def test_summary_throughput_slo_and_goodput():
    records = [
        record(0, 0.0, [0.5, 0.52, 0.54], 0.6, out=6, prompt=100),  # TTFT 500, TPOT 20: meets
        record(1, 0.0, [2.5, 2.6], 2.7, out=3, prompt=50),  # TTFT 2500: misses
        record(2, 1.0, [1.1, 1.5], 2.1, out=11, prompt=50),  # TPOT 100: misses
        record(3, 1.0, [1.2], 1.2, out=1, prompt=20),  # one token: no TPOT, meets
        failed(4),
    ]
    s = summarize(records, duration=4.0, slo=Slo(ttft_ms=2000, tpot_ms=50))
    assert (s["completed"], s["failed"]) == (4, 1)
    assert s["total_input_tokens"] == 220 and s["total_output_tokens"] == 21
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(21 / 4)
    assert s["total_token_throughput"] == pytest.approx(241 / 4)
    assert s["slo_met"] == 2
    assert s["slo_attainment"] == pytest.approx(2 / 5)  # failed requests count against the SLO
    assert s["goodput"] == pytest.approx(2 / 4)
    assert s["mean_ttft_ms"] == pytest.approx((500 + 2500 + 100 + 200) / 4)
    assert s["mean_tpot_ms"] == pytest.approx((20 + 100 + 100) / 3)  # the 1-token request has none
    assert s["mean_itl_ms"] == pytest.approx((20 + 20 + 100 + 400) / 4)
    assert s["mean_e2el_ms"] == pytest.approx((600 + 2700 + 1100 + 200) / 4)
    assert s["error_counts"] == {"HTTP 503: no decode instance": 1}
    d = details(records)
    assert d["ttfts"][4] is None and d["errors"][4].startswith("HTTP 503")
    assert d["output_lens"] == [6, 3, 11, 1, 0]


def test_empty_and_all_failed_runs_do_not_divide_by_zero():
    s = summarize([failed(0), failed(1)], duration=0.0, slo=Slo())
    assert s["completed"] == 0 and s["failed"] == 2 and s["goodput"] == 0
    assert s["slo_attainment"] == 0 and s["mean_ttft_ms"] is None
    assert summarize([], duration=1.0, slo=Slo())["slo_attainment"] is None


def test_ratios_are_against_the_first_topology_at_the_same_load_point():
    base = {"slo_ttft_ms": 2000.0, "slo_tpot_ms": 50.0, "num_prompts": 4, "completed": 4, "failed": 0}
    runs = []
    for topology, rate, goodput in [
        ("EPD1", "1", 1.0),
        ("E1 P1 D1", "1", 1.5),
        ("EPD1", "4", 2.0),
        ("E1 P1 D1", "4", 0.0),
    ]:
        s = summarize([record(0, 0.0, [0.1, 0.2], 0.3, out=3)], duration=1.0, slo=Slo())
        runs.append({**base, **s, "topology": topology, "load_label": f"{rate} req/s", "goodput": goodput})
    add_ratios(runs)
    assert [r["goodput_ratio"] for r in runs] == [1.0, 1.5, 1.0, 0.0]
    assert all(r["baseline"] == "EPD1" for r in runs)
    table = format_tables(runs)
    assert "1.50x" in table and table.count("ratio to EPD1") == 2
