"""Qwen3-VL's video frame plan without torch: which frames, what size, and their timestamps.

`Qwen3VLVideoProcessor` differs from Qwen2-VL's (common/video_sampling.py) in three rules, re-implemented
here from its source as plain Python so that the gateway plans a Qwen3-VL video as the encoder (and
transformers) will sample it:

- frames: `int(total / video_fps * fps)` clamped to [min_frames, min(max_frames, total)] (no rounding to
  whole temporal patches), placed by `np.linspace(0, total - 1, n).round()`; a fixed `num_frames` is
  used as given;
- size: its `smart_resize` bounds the pixels of all the frames together (`t_bar * h * w` against
  `size.longest_edge`), not one frame's; with `cap_pixels_per_frame`, the budget is
  `max(min(max_video_tokens * factor**2, longest // frames), 1.05 * shortest) * frames`;
- the prompt: a timestamp per temporal patch (common/qwen3_vl_video.py), from the sampled indices.

The class subclasses `VideoSampling`, so the wire form (`VideoSettings`), `sampling_of` and
`prepare_video` carry it unchanged; only the standard library is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.qwen3_vl_video import frame_timestamps
from common.video_sampling import VideoSampling

# Qwen3VLVideoProcessor's class defaults where they differ from Qwen2-VL's
QWEN3_VL_VIDEO_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
    "max_video_tokens": 768,
}


def linspace_round(stop: int, num: int) -> list[int]:
    """`np.linspace(0, stop, num).round().astype(int)`: i * step in doubles, the last exactly `stop`,
    rounded half to even (as numpy's `round`)."""
    if num < 1:
        return []
    if num == 1:
        return [0]
    step = stop / (num - 1)
    return [round(i * step) for i in range(num - 1)] + [stop]


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """`video_processing_qwen3_vl.smart_resize`: the (height, width) every frame is resized to."""
    if num_frames < temporal_factor:
        raise ValueError(
            f"a video of {num_frames} sampled frames is shorter than a temporal patch ({temporal_factor})"
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True, slots=True)
class Qwen3VLVideoSampling(VideoSampling):
    """`VideoSampling` with Qwen3-VL's rules; `min_pixels`/`max_pixels` are `size.shortest_edge` and
    `size.longest_edge`, which bound a whole video's pixels here."""

    patch_size: int = 16
    min_pixels: int = QWEN3_VL_VIDEO_DEFAULTS["size"]["shortest_edge"]
    max_pixels: int = QWEN3_VL_VIDEO_DEFAULTS["size"]["longest_edge"]
    max_video_tokens: int = 768

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Qwen3VLVideoSampling:
        """A checkpoint's `video_preprocessor_config.json`; missing keys keep Qwen3-VL's defaults."""
        return super(Qwen3VLVideoSampling, cls).from_config({**QWEN3_VL_VIDEO_DEFAULTS, **config})  # type: ignore[return-value]

    def num_sampled(self, total_frames: int, video_fps: float) -> int:
        if self.num_frames is not None:
            return self.num_frames
        wanted = int(total_frames / video_fps * self.fps)
        return min(max(wanted, self.min_frames), self.max_frames, total_frames)

    def sample_frames(self, total_frames: int, video_fps: float) -> list[int]:
        """The kept frames' indices, exactly as `Qwen3VLVideoProcessor.sample_frames`."""
        if total_frames < 1:
            raise ValueError(f"the video has no frames (total_frames={total_frames})")
        if not video_fps > 0:
            raise ValueError(f"video_fps must be positive, got {video_fps}")
        return linspace_round(total_frames - 1, self.num_sampled(total_frames, video_fps))

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            frame_cap = self.max_video_tokens * self.factor * self.factor
            per_frame = max(min(frame_cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(
            num_frames, height, width, self.temporal_patch_size, self.factor, self.min_pixels, max_pixels
        )

    def timestamps(self, indices: list[int], video_fps: float) -> list[float]:
        """Seconds of each temporal patch, as `Qwen3VLProcessor` writes them into the prompt."""
        return frame_timestamps(indices, video_fps, self.temporal_patch_size)
