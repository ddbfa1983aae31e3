"""The packed-linear benchmark times `F.linear`, packed with activations apart and packed and fused on
decode steps and the encoder, and reports whether their greedy tokens agree."""

from __future__ import annotations

import json

from bench.packed_linear import main


def test_a_run_reports_every_variant(tiny_qwen2_vl, tmp_path):
    out = tmp_path / "packed.json"
    args = ["--model", str(tiny_qwen2_vl), "--batch", "1,2", "--context", "8", "--steps", "6", "--threads", "1",
            "--encoder-repeats", "1", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["what"] for r in runs] == [
        "decode step, batch 1",
        "decode step, batch 2",
        "encoder, one 224x224 image",
    ]
    assert all(r["torch"] > 0 and r["apart"] > 0 and r["onednn"] > 0 for r in runs)
    assert [r["same_tokens"] for r in runs[:2]] == ["1/1", "2/2"]
