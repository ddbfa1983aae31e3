"""`python -m bench.kv_overlap` runs on the tiny checkpoint and reports all three timings per length."""

from __future__ import annotations

import json

from bench.kv_overlap import main


def test_kv_overlap_reports_compute_handoff_and_layered_times(tiny_qwen2_vl, tmp_path):
    out = tmp_path / "overlap.json"
    assert (
        main(["--model", str(tiny_qwen2_vl), "--lengths", "32,64", "--repeats", "1", "--output", str(out)])
        == 0
    )
    runs = json.loads(out.read_text())["runs"]
    assert [r["prompt_tokens"] for r in runs] == [32, 64]
    assert all(r["compute_s"] > 0 and r["handoff_s"] > 0 and r["layered_s"] > 0 for r in runs)
