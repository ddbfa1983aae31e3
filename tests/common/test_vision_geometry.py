"""The torch-free geometry must give exactly the grid the real image processor gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from common.vision_geometry import (
    VisionGeometry,
    image_grid_thw,
    num_image_tokens,
    smart_resize,
)

# (width, height): tiny, exact multiples, odd, round-half-to-even cases (70 / 28 = 2.5), very wide
# and very tall, and sizes far above max_pixels.
SIZES = [
    (1, 1),
    (10, 7),
    (28, 28),
    (29, 27),
    (70, 42),
    (101, 333),
    (448, 448),
    (449, 447),
    (1000, 30),
    (30, 2500),
    (1920, 1080),
    (3001, 2003),
]
LIMITS = [(28 * 28 * 4, 448 * 448), (56 * 56, 28 * 28 * 1280)]


def _processor_grid(processor: Qwen2VLImageProcessorPil, width: int, height: int) -> tuple[int, int, int]:
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    grid = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    return tuple(int(x) for x in grid)


@pytest.mark.parametrize("min_pixels,max_pixels", LIMITS)
def test_matches_image_processor(min_pixels: int, max_pixels: int) -> None:
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    geometry = VisionGeometry(min_pixels=min_pixels, max_pixels=max_pixels)
    for width, height in SIZES:
        expected = _processor_grid(processor, width, height)
        assert geometry.grid(width, height) == expected, (width, height)
        grid = image_grid_thw(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        assert grid == expected
        assert geometry.num_tokens(width, height) == expected[0] * expected[1] * expected[2] // 4
        gh, gw = expected[1] * 14, expected[2] * 14
        assert min_pixels <= gh * gw <= max_pixels or min(gh, gw) == 28, (width, height)


def test_from_saved_checkpoint(tiny_qwen2_vl: Path) -> None:
    geometry = VisionGeometry.from_dir(tiny_qwen2_vl)
    assert geometry == VisionGeometry.from_dir(tiny_qwen2_vl / "preprocessor_config.json")
    assert (geometry.min_pixels, geometry.max_pixels) == (28 * 28 * 4, 448 * 448)
    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_vl)
    for width, height in SIZES:
        assert geometry.grid(width, height) == _processor_grid(processor, width, height)
    assert geometry.num_tokens(448, 448) == 256


def test_config_forms() -> None:
    v5 = VisionGeometry.from_dict({"size": {"shortest_edge": 100, "longest_edge": 2000}, "merge_size": 2})
    legacy_top = VisionGeometry.from_dict(
        {"min_pixels": 100, "max_pixels": 2000, "size": {"shortest_edge": 1}}
    )
    legacy_size = VisionGeometry.from_dict({"size": {"min_pixels": 100, "max_pixels": 2000}})
    assert v5 == legacy_top == legacy_size == VisionGeometry(min_pixels=100, max_pixels=2000)
    assert VisionGeometry.from_dict({}) == VisionGeometry()


def test_helpers() -> None:
    assert smart_resize(448, 448) == (448, 448)
    assert smart_resize(70, 70) == (56, 56)  # round(2.5) == 2
    assert num_image_tokens((1, 32, 32)) == 256
    assert num_image_tokens([2, 4, 6], merge_size=2) == 12


def test_rejects_extreme_aspect_ratio_like_transformers() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    processor = Qwen2VLImageProcessorPil()
    with pytest.raises(ValueError, match="aspect ratio"):
        _processor_grid(processor, 2500, 10)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def test_imports_no_torch() -> None:
    code = (
        "import sys, json; import common.vision_geometry; "
        "print(json.dumps([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
