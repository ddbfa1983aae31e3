"""Qwen2-VL video geometry without torch: which frames are sampled, their size, and the token count.

The gateway must expand each `<|video_pad|>` to the right number of placeholder tokens before any
encoder sees the video, so it needs the video processor's rules without importing torch or
transformers. This module re-implements them from transformers' `Qwen2VLVideoProcessor` (which
Qwen2.5-VL uses too) as pure functions on ints and floats:

- `sample_frames`: how many frames, and which, for a video of `total_frames` at `video_fps`;
- `resized_size`: the (height, width) every sampled frame is resized to (`smart_resize`);
- `grid_thw`, `num_tokens`, `second_per_grid_t`: the patch grid, the placeholder count and, for
  Qwen2.5-VL's temporal positions, the seconds one temporal patch spans.

Only the standard library is imported here, as in `vision_geometry`; keep it that way.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from common.vision_geometry import smart_resize

# Qwen2VLVideoProcessor's class defaults (Qwen2.5-VL loads the same class).
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
DEFAULT_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 768 * 28 * 28
DEFAULT_MAX_VIDEO_TOKENS = 128000
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"

# torch fills a float32 `arange` on the CPU 8 lanes at a time (the AVX2 kernel, which AVX-512 CPUs run
# as well; generic builds have 8 lanes too). aarch64 builds have 4, which can move an index by one on
# videos of more than about 16,000 sampled-from frames; we keep 8 so the plan never depends on the host.
_TORCH_FLOAT_LANES = 8


def _f32(x: float) -> float:
    """Round a double to the nearest float32, as a C++ cast does."""
    return struct.unpack("f", struct.pack("f", x))[0]


def torch_arange_int(total: int, num: int) -> list[int]:
    """`torch.arange(0, total, total / num).int().tolist()`, computed without torch.

    The length is `ceil(total / (total / num))` in doubles, which is sometimes num + 1. Each value is
    rounded to float32 before truncation, and the vectorised kernel rounds the start of each block of
    lanes to float32 before adding multiples of the step. A plain `i * total // num` agrees up to about
    16,000 frames, then differs on about one video in ten (measured up to an hour at 30 fps).
    """
    step = total / num
    length = math.ceil(total / step)
    lanes = _TORCH_FLOAT_LANES
    values: list[int] = []
    i = 0
    while i <= length - 2 * lanes:  # torch's vectorised loop runs two vectors per iteration
        for start in (i, i + lanes):
            base = _f32(step * start)
            values.extend(int(_f32(base + k * step)) for k in range(lanes))
        i += 2 * lanes
    values.extend(int(_f32(step * j)) for j in range(i, length))
    return values


@dataclass(frozen=True, slots=True)
class VideoSampling:
    """The video processor settings that decide the frames and the grid.

    `num_frames`, when set, asks for a fixed count instead of `fps` (transformers gives it priority).
    `cap_pixels_per_frame` is transformers' opt-in bound on a whole video's pixels (off by default
    there, as here).
    """

    fps: float = DEFAULT_FPS
    num_frames: int | None = None
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    temporal_patch_size: int = 2
    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        for name in ("min_frames", "max_frames", "temporal_patch_size", "patch_size", "merge_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VideoSampling:
        """Read a checkpoint's `video_preprocessor_config.json` (as a dict); missing keys keep defaults.

        Pixel limits come as `size={"shortest_edge": min, "longest_edge": max}` (pixel counts, despite
        the names) or, in older files, as top-level `min_pixels`/`max_pixels` (which win, as in the
        processor's `__init__`) or `size={"min_pixels", "max_pixels"}`. `do_sample_frames` is ignored:
        the gateway always samples, since not sampling would feed the encoder every frame.
        """
        size = config.get("size") or {}

        def pick(*values: Any, default: Any) -> Any:
            return next((v for v in values if v is not None), default)

        num_frames = config.get("num_frames")
        return cls(
            fps=float(pick(config.get("fps"), default=DEFAULT_FPS)),
            num_frames=None if num_frames is None else int(num_frames),
            min_frames=int(pick(config.get("min_frames"), default=DEFAULT_MIN_FRAMES)),
            max_frames=int(pick(config.get("max_frames"), default=DEFAULT_MAX_FRAMES)),
            temporal_patch_size=int(pick(config.get("temporal_patch_size"), default=2)),
            patch_size=int(pick(config.get("patch_size"), default=14)),
            merge_size=int(pick(config.get("merge_size"), default=2)),
            min_pixels=int(
                pick(
                    config.get("min_pixels"),
                    size.get("shortest_edge"),
                    size.get("min_pixels"),
                    default=DEFAULT_MIN_PIXELS,
                )
            ),
            max_pixels=int(
                pick(
                    config.get("max_pixels"),
                    size.get("longest_edge"),
                    size.get("max_pixels"),
                    default=DEFAULT_MAX_PIXELS,
                )
            ),
            cap_pixels_per_frame=bool(config.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(pick(config.get("max_video_tokens"), default=DEFAULT_MAX_VIDEO_TOKENS)),
        )

    @property
    def factor(self) -> int:
        """Frame sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def num_sampled(self, total_frames: int, video_fps: float) -> int:
        """How many frames `sample_frames` asks for, before the indices are computed.

        With `fps`: total / video_fps * fps, clamped to [min_frames, min(max_frames, total)], then
        floored to a multiple of temporal_patch_size (the processor floors; it does not round). A
        video shorter than temporal_patch_size gets 0 in transformers, which then divides by zero;
        here it keeps all its frames (and `padded_indices` repeats the last one, as `patchify` does).
        """
        tps = self.temporal_patch_size
        if self.num_frames is not None:
            num = round(self.num_frames / tps) * tps
            if num > total_frames:
                raise ValueError(f"the model samples {num} frames but the video has only {total_frames}")
        else:
            max_frames = math.floor(min(self.max_frames, total_frames) / tps) * tps
            wanted = total_frames / video_fps * self.fps
            num = math.floor(min(max(wanted, self.min_frames), max_frames, total_frames) / tps) * tps
        return num or min(total_frames, tps)

    def sample_frames(self, total_frames: int, video_fps: float) -> list[int]:
        """The indices of the frames to keep, in order, exactly as `Qwen2VLVideoProcessor.sample_frames`.

        torch's arange sometimes gives one index more than asked for, equal to `total_frames`; no such
        frame exists (transformers' PyAV reader never finds it), so it is dropped here.
        """
        if total_frames < 1:
            raise ValueError(f"the video has no frames (total_frames={total_frames})")
        if not video_fps > 0:
            raise ValueError(f"video_fps must be positive, got {video_fps}")
        num = self.num_sampled(total_frames, video_fps)
        return [i for i in torch_arange_int(total_frames, num) if i < total_frames]

    def padded_indices(self, indices: list[int]) -> list[int]:
        """`indices` with the last repeated up to a multiple of temporal_patch_size (`patchify` pads so)."""
        pad = -len(indices) % self.temporal_patch_size
        return list(indices) + [indices[-1]] * pad

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """The (height, width) each of `num_frames` sampled frames is resized to.

        `smart_resize` with min/max_pixels per frame, as `Qwen2VLVideoProcessor.resize` calls it. With
        `cap_pixels_per_frame`, max_pixels is first lowered to an even share of 90% of
        `max_video_tokens` tokens' worth of pixels (times temporal_patch_size), but not below
        1.05 x min_pixels; `num_frames` matters only then.
        """
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            total_pixels = int(self.max_video_tokens * self.factor * self.factor * 0.9)
            share = total_pixels * self.temporal_patch_size // num_frames
            max_pixels = max(min(max_pixels, share), int(self.min_pixels * 1.05))
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels)

    def grid_thw(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """`video_grid_thw` for `num_frames` sampled frames of height x width (before resizing)."""
        h, w = self.resized_size(num_frames, height, width)
        t = math.ceil(num_frames / self.temporal_patch_size)
        return t, h // self.patch_size, w // self.patch_size

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """`<|video_pad|>` tokens: one per merge_size x merge_size block of patches."""
        t, h, w = self.grid_thw(num_frames, height, width)
        return t * h * w // (self.merge_size * self.merge_size)

    def second_per_grid_t(self, num_sampled: int, total_frames: int, video_fps: float) -> float:
        """Seconds per temporal patch, Qwen2.5-VL's `second_per_grid_ts` entry for this video.

        `Qwen2_5_VLProcessor` divides temporal_patch_size by the rate of the sampled frames,
        `num_sampled / total_frames * video_fps` (`VideoMetadata.sampled_fps`), not by the fps asked for.
        """
        return self.temporal_patch_size / (num_sampled / total_frames * video_fps)
