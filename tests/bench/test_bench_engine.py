"""`epd-serve bench-engine` runs end to end on a tiny checkpoint and reports every run it compares."""

from __future__ import annotations

import json

from cli.main import main


def test_bench_engine_reports_ours_and_transformers(tiny_qwen2_vl, tmp_path, capsys):
    out = tmp_path / "engine.json"
    args = [
        "bench-engine", "--model", str(tiny_qwen2_vl), "--num-requests", "6", "--max-in-flight", "3",
        "--min-out", "2", "--max-out", "6", "--image-size", "56", "--repeats", "1", "--output", str(out),
        "--backends", "sdpa",
    ]  # fmt: skip
    # one backend: the report's plumbing is the same for each (flex's compiled kernels, 30 s of
    # inductor here, are checked against transformers in tests/services/engine/attention/)
    assert main(args) == 0
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert set(runs) == {
        "ours, sdpa attention",
        "transformers generate, padded batches of 3",
        "transformers generate, one by one",
    }
    assert all(r["useful_tokens_per_s"] > 0 for r in runs.values())
    assert report["useful_tokens"] >= 12
    assert "best ours is" in capsys.readouterr().out
