"""Qwen2-VL image geometry without torch: how an image is resized and how many tokens it takes.

The gateway must expand each `<|image_pad|>` to the right number of placeholder tokens (and check a
prompt's length) before any encoder sees the image. Importing torch or transformers there would cost
seconds of start-up and hundreds of MB, so this module re-implements the few lines of Qwen2-VL's resize
rule in plain Python. Tests compare it with `Qwen2VLImageProcessorPil` on many sizes.

Only the standard library is imported here; keep it that way. It sits in `common/`, not with the model
families, because the gateway imports nothing from `services/`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# Qwen2VLImageProcessor's defaults, used when a saved config leaves a field out.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image to, exactly as transformers computes it.

    Both sides become multiples of `factor` (patch size times merge size), the area is brought within
    [min_pixels, max_pixels], and the aspect ratio is kept as closely as possible. Python's `round`
    (half to even) is part of the rule: do not replace it.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid_thw(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of one image, as in the image processor's `image_grid_thw`.

    A still image is one temporal step (it is repeated `temporal_patch_size` times inside a patch), so
    t is always 1 here; `temporal_patch_size` is accepted for symmetry with the processor's settings.
    """
    del temporal_patch_size
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return 1, h // patch_size, w // patch_size


def num_image_tokens(grid: tuple[int, int, int] | list[int], merge_size: int = 2) -> int:
    """Placeholder tokens for a grid: each merge_size x merge_size block of patches is one token."""
    t, h, w = (int(x) for x in grid)
    return t * h * w // (merge_size * merge_size)


@dataclass(frozen=True)
class VisionGeometry:
    """The image processor settings that decide the grid, read from a checkpoint's preprocessor config."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VisionGeometry:
        """Accept every form the pixel limits are saved in.

        transformers 5 saves `size={"shortest_edge": min, "longest_edge": max}` (pixel counts, despite
        the names); older checkpoints have top-level `min_pixels`/`max_pixels` or
        `size={"min_pixels", "max_pixels"}`. Top-level keys win, as in the image processor itself.
        """
        size = config.get("size") or {}
        min_pixels = _first(config.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"))
        max_pixels = _first(config.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"))
        return cls(
            patch_size=int(config.get("patch_size") or 14),
            merge_size=int(config.get("merge_size") or 2),
            temporal_patch_size=int(config.get("temporal_patch_size") or 2),
            min_pixels=int(min_pixels if min_pixels is not None else DEFAULT_MIN_PIXELS),
            max_pixels=int(max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> VisionGeometry:
        """Read `preprocessor_config.json` from a checkpoint folder (or that file's own path)."""
        path = Path(path)
        if path.is_dir():
            path = path / PREPROCESSOR_CONFIG
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) grid for an image of `width` x `height` pixels (PIL's `Image.size` order)."""
        return image_grid_thw(
            height,
            width,
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def num_tokens(self, width: int, height: int) -> int:
        """How many `<|image_pad|>` tokens an image of `width` x `height` pixels expands to."""
        return num_image_tokens(self.grid(width, height), self.merge_size)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
