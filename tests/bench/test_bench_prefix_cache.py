"""`python -m bench.prefix_cache` runs on a tiny checkpoint: both engines give the same tokens, and the
cached one finds the shared prefix (text alone, and with an image after it)."""

from __future__ import annotations

import json

import pytest

from bench.prefix_cache import main


@pytest.mark.parametrize("image", ["56x56"])
def test_prefix_cache_bench_compares_equal_answers(tiny_qwen2_vl, tmp_path, image):
    out = tmp_path / "prefix.json"
    args = [
        "--model",
        str(tiny_qwen2_vl),
        "--requests",
        "2",
        "--shared",
        "64",
        "--tail",
        "8",
        "--output",
        str(out),
    ]
    assert main(args + (["--image", image] if image else [])) == 0
    report = json.loads(out.read_text())
    assert report["mean_cached_tokens"] >= 64  # the shared part (and the image) came from the cache
    assert report["ttft_ms_cached"] > 0 and report["ttft_ms_uncached"] > 0
