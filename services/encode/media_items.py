"""What the encoder does with an item's bytes before the encoder model: decode an image, a video or audio.

A video is decoded here, not at the gateway: decoding and resizing its sampled frames is the
compute-heavy part of the request's preprocessing, and keeping it in the encode stage is what lets
encoders scale apart from the gateway. The gateway only probed the video (frame count, rate, first
frame's size) to count its tokens, and sends the sampling settings it planned with; the encoder
samples with those, so its grid is the one the prompt was expanded for (checked in
`Qwen2VLFamily.preprocess_video`).

Audio arrives as the bytes the client sent (far smaller than the decoded samples) and is decoded again
here with the same code the gateway counted its tokens with (common/audio.py), resampled to the
feature extractor's rate and cut to the duration the gateway used (`MMItem.max_seconds`), so the
clip has the same length on both sides; the family then makes Whisper features from it.
"""

from __future__ import annotations

import math
from typing import Any

from common.audio import decode_audio
from common.media import decode_image
from common.protocol import MM_KINDS, MMItem
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
ENCODER_AUDIO_MAX_BYTES = 256 * 1024 * 1024
ENCODER_AUDIO_MAX_SECONDS = 600.0  # the gateway's max_audio_seconds may not exceed it


def item_problem(index: int, item: MMItem) -> str | None:
    """A known kind, and for a video, settings within the encoder's bounds."""
    if item.kind not in MM_KINDS:
        return f"items[{index}].kind {item.kind[:32]!r} is not one of {', '.join(MM_KINDS)}"
    if item.kind == "video" and (problem := settings_problem(item.video)):
        return f"items[{index}].video: {problem}"
    if item.kind != "video" and item.video is not None:
        return f"items[{index}]: an {item.kind} item has no video settings"
    s = item.max_seconds
    if item.kind == "audio" and not (math.isfinite(s) and 0 < s <= ENCODER_AUDIO_MAX_SECONDS):
        return f"items[{index}].max_seconds must be in (0, {ENCODER_AUDIO_MAX_SECONDS:g}], got {s}"
    return None


def prepare_item(family: Any, item: MMItem, data: bytes) -> Any:
    """The family's encoder input for one image, video or audio clip; `MediaError` or `ValueError`
    when the bytes cannot be used or the model takes no such input (the request's fault: a 400)."""
    if item.kind not in getattr(family, "modalities", ("image", "video")):
        raise ValueError(f"this model takes no {item.kind} input")
    if item.kind == "audio":
        samples = decode_audio(
            data, sampling_rate=family.sampling_rate, max_bytes=ENCODER_AUDIO_MAX_BYTES,
            max_seconds=item.max_seconds,
        )  # fmt: skip
        return family.preprocess_audio(samples)
    if item.kind != "video":
        return family.preprocess(decode_image(data))
    assert item.video is not None  # item_problem checked it
    sampling = sampling_of(item.video, family.video_sampling)
    decoded = decode_video(data, sampling=sampling, limits=ENCODER_VIDEO_LIMITS)
    return family.preprocess_video(prepare_video(decoded, sampling))
