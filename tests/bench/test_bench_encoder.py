"""`python -m bench.encoder` times each encoder dtype on the same images and reports how close the
features stay to float32's."""

from __future__ import annotations

import json

from bench.encoder import main


def test_encoder_bench_reports_every_dtype(tiny_qwen2_vl, tmp_path):
    out = tmp_path / "encoder.json"
    args = ["--model", str(tiny_qwen2_vl), "--image-size", "56x56", "--batch", "1,2", "--repeats", "1"]
    assert main(args + ["--output", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"1", "2"}
    for run in runs.values():
        assert set(run["ms_per_image"]) == {"float32", "bfloat16"} and min(run["ms_per_image"].values()) > 0
        assert run["max_abs_diff"]["float32"] == 0.0 and 0 < run["max_abs_diff"]["bfloat16"] < 1.0
