"""`epd-serve bench` and `epd-serve bench-dataplane` as a user runs them: real processes, JSON out."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from bench.serve.metrics import LATENCIES, PERCENTILES


def epd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the [bench] extra


def test_bench_runs_a_topology_end_to_end(tiny_qwen2_vl, tmp_path):
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    plot_args = ["--plot-dir", str(plots)] if HAS_MATPLOTLIB else []
    run = epd(
        "bench", "--topologies", "EPD1", "--model", str(tiny_qwen2_vl), "--num-requests", "6",
        "--rate", "inf", "--output-len", "4", "--images", "1", "--image-size", "56x56",
        "--prompt-len", "16", "--warmup", "1", "--threads", "1", "--kv-cache-memory", "32",
        "--no-progress", "--output", str(out), *plot_args,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [] and len(report["runs"]) == 1
    r = report["runs"][0]
    assert (r["completed"], r["failed"], r["topology"], r["request_rate"]) == (6, 0, "EPD1", "inf")
    assert r["total_output_tokens"] == 24 and r["output_lens"] == [4] * 6  # ignore_eos held the lengths
    assert r["total_input_tokens"] > 6 * 16 and r["images_sent"] == 6
    for name in LATENCIES:
        for stat in ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]:
            assert r[f"{stat}_{name}_ms"] is not None and r[f"{stat}_{name}_ms"] >= 0, (stat, name)
    for field in ["request_throughput", "output_throughput", "total_token_throughput", "goodput"]:
        assert r[field] > 0, field
    assert 0 <= r["slo_attainment"] <= 1 and r["goodput_ratio"] == 1.0
    assert len(r["ttfts"]) == 6 and r["exited_stages"] == []
    assert "EPD1" in run.stdout and "goodput" in run.stdout
    for name in ["ttft_cdf.png", "tpot_cdf.png", "goodput.png"] if HAS_MATPLOTLIB else []:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_remote_targets_and_bad_lists():
    run = epd("bench", "--base-url", "http://203.0.113.7:8000/v1", "--num-requests", "1", timeout=30)
    assert run.returncode == 2 and "loopback" in run.stderr
    run = epd("bench", "--rate", "0,2", timeout=30)
    assert run.returncode == 2 and "bad rate" in run.stderr
    run = epd("bench", "--topologies", "EPD1,X1", timeout=30)
    assert run.returncode == 2 and "X1" in run.stderr


def test_bench_dataplane_reports_positive_throughput(tmp_path):
    out = tmp_path / "dataplane.json"
    run = epd(
        "bench-dataplane",
        "--sizes",
        "1",
        "--backends",
        "shm,tcp,tcp+curve",
        "--repeats",
        "1",
        "--output",
        str(out),
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"memcpy", "shm", "tcp", "tcp+curve"}
    for row in rows.values():
        assert row["gbps"] > 0 and row["ratio_to_memcpy"] > 0 and row["verified"] and row["bytes"] == 1 << 20
    assert "shm" in run.stdout and "vs memcpy" in run.stdout
