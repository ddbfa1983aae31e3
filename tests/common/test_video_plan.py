"""The gateway's video plan from a probe equals what the encoder makes from the decoded frames; the
settings survive the wire; the encoder refuses settings out of bounds; the cache key covers both."""

from __future__ import annotations

import msgspec
import pytest

from common.hashing import content_hash
from common.protocol import MMItem, MMRef, VideoSettings
from common.video import decode_video, prepare_video, probe_video
from common.video_plan import plan_video, sampling_of, settings_of, settings_problem, video_key
from common.video_sampling import VideoSampling
from tests.video_helpers import make_video

SMALL = VideoSampling(min_pixels=28 * 28 * 4, max_pixels=224 * 224, max_frames=64)


@pytest.mark.parametrize(
    ("count", "width", "height", "fps", "sampling"),
    [
        (8, 56, 56, 8, SMALL),  # raised to min_frames
        (30, 100, 60, 10, SMALL),  # 3 s at 2 fps: 6 frames, sides rounded to 28
        (17, 84, 112, 30, VideoSampling(fps=30.0, min_pixels=3136, max_pixels=12544)),  # an odd count
        (9, 320, 240, 3, VideoSampling()),  # Qwen's defaults: resized up to min_pixels
    ],
)
def test_the_probe_plan_equals_the_decoded_plan(count, width, height, fps, sampling):
    data = make_video(count, width, height, fps)
    probe = probe_video(data)
    assert (probe.total_frames, probe.video_fps, probe.width, probe.height) == (count, fps, width, height)
    plan = plan_video(probe, sampling)
    prepared = prepare_video(decode_video(data, sampling=sampling), sampling)
    assert plan.grid_thw == prepared.grid_thw and plan.num_tokens == prepared.num_tokens
    assert plan.second_per_grid_t == prepared.second_per_grid_t
    assert prepared.frames.shape[0] == plan.grid_thw[0] * sampling.temporal_patch_size


def test_settings_round_trip_through_the_wire():
    sampling = VideoSampling(
        fps=3.0, num_frames=8, min_pixels=3136, max_pixels=50176, cap_pixels_per_frame=True
    )
    settings = settings_of(sampling)
    item = MMItem(hash="h", frame=0, kind="video", video=settings)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(item), type=MMItem)
    assert back == item and sampling_of(back.video, VideoSampling()) == sampling
    assert settings_problem(settings) is None


def test_old_messages_still_decode_as_images():
    old_item = msgspec.msgpack.encode({"hash": "h", "frame": 0})
    assert msgspec.msgpack.decode(old_item, type=MMItem) == MMItem(hash="h", frame=0, kind="image")
    old_ref = msgspec.msgpack.encode({"hash": "h", "grid_thw": [1, 4, 4], "num_tokens": 4})
    ref = msgspec.msgpack.decode(old_ref, type=MMRef)
    assert ref.kind == "image" and ref.second_per_grid_t == 0.0


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"fps": 0.0}, "fps must be in"),
        ({"fps": float("nan")}, "fps must be in"),
        ({"num_frames": 10**6}, "num_frames"),
        ({"min_frames": 9, "max_frames": 8}, "min_frames <= max_frames"),
        ({"max_pixels": 10**12}, "max_pixels"),
        ({"max_video_tokens": 0}, "max_video_tokens"),
    ],
)
def test_settings_out_of_bounds_are_named(fields, words):
    assert words in (settings_problem(VideoSettings(**fields)) or "")


def test_the_cache_key_covers_the_bytes_and_the_settings():
    data = make_video(8, 56, 56, 8)
    base = settings_of(SMALL)
    keys = {
        video_key(data, base),
        video_key(
            data, settings_of(VideoSampling(fps=4.0, min_pixels=3136, max_pixels=50176, max_frames=64))
        ),
        video_key(data, settings_of(VideoSampling(min_pixels=3136, max_pixels=100352, max_frames=64))),
        video_key(make_video(8, 56, 56, 8, seed=1), base),
        content_hash(data),
    }
    assert len(keys) == 5 and video_key(bytearray(data), settings_of(SMALL)) == video_key(data, base)


def test_a_rotated_video_is_planned_upright():
    """Phones store portrait video sideways with a display rotation: the probe swaps the sides."""
    from tests.common.test_video import _rotated_mp4

    data = _rotated_mp4(make_video(4, 112, 56, 4))
    probe = probe_video(data)
    decoded = decode_video(data, sampling=SMALL)
    assert (probe.width, probe.height) == (56, 112) and decoded.frames.shape[1:3] == (112, 56)
    plan = plan_video(probe, SMALL)
    assert plan.grid_thw == prepare_video(decoded, SMALL).grid_thw == (2, 8, 4)
