"""A video's plan, agreed by the gateway and the encoder: the settings that shape it, its grid, its key.

The gateway counts a video's `<|video_pad|>` tokens before any encoder has seen it, from a probe (frame
count, rate, first frame's size) and the checkpoint's sampling settings. The encoder must then make
exactly that many feature rows, so the gateway sends the settings it planned with (`VideoSettings` on
the wire) and the encoder samples with those, not with whatever its own copy of the config says. The
embedding-cache key covers the bytes and those settings: the same file sampled at another fps is
another item. Torch-free: the gateway imports this.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import msgspec

from common.hashing import context_hash
from common.protocol import VideoSettings
from common.video import VideoProbe
from common.video_sampling import VideoSampling

# Bounds the encoder accepts in a VideoSettings: wide enough for any real checkpoint's config
# (Qwen's use 2 fps, 4 to 768 frames, up to 768 x 28 x 28 pixels per frame), tight enough that a
# malformed message cannot ask for unbounded work.
MAX_FPS = 240.0
MAX_FRAMES = 4096
MAX_FRAME_PIXELS = 8192 * 8192
MAX_VIDEO_TOKENS = 10_000_000


@dataclass(frozen=True, slots=True)
class VideoPlan:
    """What the prompt and the prefill stage need to know about one video before it is encoded."""

    num_frames: int  # sampled, before padding to whole temporal patches
    grid_thw: tuple[int, int, int]
    num_tokens: int
    second_per_grid_t: float
    # Qwen3-VL: the seconds of each temporal patch, written into the prompt; () for other families
    timestamps: tuple[float, ...] = ()


def plan_video(probe: VideoProbe, sampling: VideoSampling) -> VideoPlan:
    """The frames `sampling` keeps of the probed video, and the grid and tokens they make.

    The same calls `common.video.prepare_video` makes on the decoded frames, from the probe alone.
    A `ValueError` (a fixed `num_frames` above the video's, an aspect ratio over 200) is the
    client's problem: the caller turns it into a 400.
    """
    indices = sampling.sample_frames(probe.total_frames, probe.video_fps)
    count = len(indices)
    size = (count, probe.height, probe.width)
    stamps = getattr(sampling, "timestamps", None)  # a family whose prompt carries frame times
    return VideoPlan(
        num_frames=count,
        grid_thw=sampling.grid_thw(*size),
        num_tokens=sampling.num_tokens(*size),
        second_per_grid_t=sampling.second_per_grid_t(count, probe.total_frames, probe.video_fps),
        timestamps=tuple(stamps(indices, probe.video_fps)) if stamps else (),
    )


def settings_of(sampling: VideoSampling) -> VideoSettings:
    """The wire form of a sampling rule (its patch geometry stays behind: it is the model's)."""
    return VideoSettings(
        fps=float(sampling.fps),
        num_frames=sampling.num_frames or 0,
        min_frames=sampling.min_frames,
        max_frames=sampling.max_frames,
        min_pixels=sampling.min_pixels,
        max_pixels=sampling.max_pixels,
        cap_pixels_per_frame=sampling.cap_pixels_per_frame,
        max_video_tokens=sampling.max_video_tokens,
    )


def sampling_of(settings: VideoSettings, geometry: VideoSampling) -> VideoSampling:
    """The rule `settings` describe, with the patch geometry of `geometry` (the encoder's model)."""
    return dataclasses.replace(
        geometry,
        fps=settings.fps,
        num_frames=settings.num_frames or None,
        min_frames=settings.min_frames,
        max_frames=settings.max_frames,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        cap_pixels_per_frame=settings.cap_pixels_per_frame,
        max_video_tokens=settings.max_video_tokens,
    )


def settings_problem(settings: VideoSettings | None) -> str | None:
    """Why the encoder must refuse these settings, or None: each within the bounds above."""
    if settings is None:
        return "a video item needs its sampling settings"
    s = settings
    if not (math.isfinite(s.fps) and 0 < s.fps <= MAX_FPS):
        return f"fps must be in (0, {MAX_FPS:g}], got {s.fps}"
    if not 0 <= s.num_frames <= MAX_FRAMES:
        return f"num_frames must be in [0, {MAX_FRAMES}], got {s.num_frames}"
    if not 1 <= s.min_frames <= s.max_frames <= MAX_FRAMES:
        return f"need 1 <= min_frames <= max_frames <= {MAX_FRAMES}, got {s.min_frames}, {s.max_frames}"
    if not 1 <= s.min_pixels <= s.max_pixels <= MAX_FRAME_PIXELS:
        return f"need 1 <= min_pixels <= max_pixels <= {MAX_FRAME_PIXELS}, got {s.min_pixels}, {s.max_pixels}"
    if not 1 <= s.max_video_tokens <= MAX_VIDEO_TOKENS:
        return f"max_video_tokens must be in [1, {MAX_VIDEO_TOKENS}], got {s.max_video_tokens}"
    return None


def video_key(data: bytes | bytearray | memoryview, settings: VideoSettings) -> str:
    """The embedding-cache key of a video: its bytes as shaped by every field of `settings`."""
    context = b"video:" + msgspec.json.encode(msgspec.structs.asdict(settings))
    return context_hash(context, data)
