"""What the encoder does with an item's bytes before the vision tower: decode an image, or a video.

A video is decoded here, not at the gateway: decoding and resizing its sampled frames is the
compute-heavy part of the request's preprocessing, and keeping it in the encode stage is what lets
encoders scale apart from the gateway. The gateway only probed the video (frame count, rate, first
frame's size) to count its tokens, and sends the sampling settings it planned with; the encoder
samples with those, so its grid is the one the prompt was expanded for (checked in
`Qwen2VLFamily.preprocess_video`).
"""

from __future__ import annotations

from typing import Any

from common.media import decode_image
from common.protocol import MM_KINDS, MMItem, VideoSettings
from common.video import VideoLimits, decode_video, prepare_video
from common.video_plan import sampling_of, settings_problem

# The gateway enforces its configured limits before it routes a video; these only bound what a
# malformed message could make an encoder do, so they are well above the gateway's defaults.
ENCODER_VIDEO_LIMITS = VideoLimits(
    max_bytes=512 * 1024 * 1024,
    max_seconds=4 * 3600.0,
    max_frame_pixels=8192 * 8192,
    max_total_frames=4 * 3600 * 120,
)


def item_problem(index: int, item: MMItem) -> str | None:
    """A known kind, and for a video, settings within the encoder's bounds."""
    if item.kind not in MM_KINDS:
        return f"items[{index}].kind {item.kind[:32]!r} is not one of {', '.join(MM_KINDS)}"
    if item.kind == "video" and (problem := settings_problem(item.video)):
        return f"items[{index}].video: {problem}"
    if item.kind == "image" and item.video is not None:
        return f"items[{index}]: an image item has no video settings"
    return None


def prepare_item(family: Any, kind: str, data: bytes, video: VideoSettings | None) -> Any:
    """The family's encoder input (patches and grid) for one image or video; `MediaError` or
    `ValueError` when the bytes cannot be used (the request's fault: a 400)."""
    if kind != "video":
        return family.preprocess(decode_image(data))
    assert video is not None  # item_problem checked it
    sampling = sampling_of(video, family.video_sampling)
    decoded = decode_video(data, sampling=sampling, limits=ENCODER_VIDEO_LIMITS)
    return family.preprocess_video(prepare_video(decoded, sampling))
