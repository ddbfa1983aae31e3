"""Qwen3-VL's torch-free frame plan against transformers' own functions: `Qwen3VLVideoProcessor`'s
`sample_frames` (called unbound), its `smart_resize` and `resize`'s pixel cap, and the processor's
timestamps, over many video lengths, rates and sizes."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
from transformers.video_utils import VideoMetadata

from common.qwen3_vl_sampling import Qwen3VLVideoSampling, linspace_round
from common.video_plan import sampling_of, settings_of


def hf_indices(total, video_fps, fps=2, min_frames=4, max_frames=768, num_frames=None):
    stub = SimpleNamespace(fps=fps, min_frames=min_frames, max_frames=max_frames)
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    return [int(i) for i in Qwen3VLVideoProcessor.sample_frames(stub, metadata, num_frames=num_frames)]


def test_linspace_round_is_numpys():
    for stop, num in itertools.product([0, 1, 2, 7, 99, 1000, 5399, 107999], [1, 2, 3, 4, 7, 64, 768]):
        assert linspace_round(stop, num) == np.linspace(0, stop, num).round().astype(int).tolist()


@pytest.mark.parametrize("fps", [2.0, 1.0, 0.5, 4.0])
def test_sampled_frames_are_the_processors(fps):
    s = Qwen3VLVideoSampling(fps=fps, max_frames=64)
    for total, video_fps in itertools.product(
        [1, 2, 3, 5, 8, 9, 30, 61, 240, 1799, 7200], [8.0, 23.976, 30.0, 60.0]
    ):
        assert s.sample_frames(total, video_fps) == hf_indices(total, video_fps, fps, 4, 64), (
            total,
            video_fps,
        )


def test_a_fixed_frame_count_is_used_as_given():
    s = Qwen3VLVideoSampling(num_frames=7)
    assert s.sample_frames(100, 30.0) == hf_indices(100, 30.0, None, num_frames=7)


@pytest.mark.parametrize("cap", [False, True])
def test_frame_sizes_are_smart_resizes(cap):
    s = Qwen3VLVideoSampling(
        min_pixels=4096, max_pixels=32 * 32 * 96, cap_pixels_per_frame=cap, max_video_tokens=16
    )
    for frames, (h, w) in itertools.product(
        [2, 3, 4, 7, 16, 64], [(56, 56), (20, 300), (480, 640), (1080, 1920), (31, 33)]
    ):
        max_pixels = s.max_pixels
        if cap:  # Qwen3VLVideoProcessor.resize
            per_frame = max(min(16 * 32 * 32, s.max_pixels // frames), int(4096 * 1.05))
            max_pixels = per_frame * frames
        expected = smart_resize(
            frames, h, w, temporal_factor=2, factor=32, min_pixels=4096, max_pixels=max_pixels
        )
        assert s.resized_size(frames, h, w) == expected, (frames, h, w)


def test_fewer_frames_than_a_temporal_patch_is_refused_as_transformers_does():
    with pytest.raises(ValueError):
        Qwen3VLVideoSampling().resized_size(1, 64, 64)


def test_timestamps_are_the_processors():
    s = Qwen3VLVideoSampling()
    for indices, fps in [
        ([0, 2, 5, 7], 8.0),
        ([0, 3, 6, 9, 13], 24.0),
        ([0], 30.0),
        (list(range(0, 90, 7)), 29.97),
    ]:
        assert s.timestamps(indices, fps) == Qwen3VLProcessor._calculate_timestamps(
            None, list(indices), fps, 2
        )


def test_config_defaults_and_the_wire_keep_the_rule():
    s = Qwen3VLVideoSampling.from_config({"fps": 1, "size": {"shortest_edge": 4096, "longest_edge": 98304}})
    assert (s.patch_size, s.min_pixels, s.max_pixels, s.max_video_tokens) == (16, 4096, 98304, 768)
    default = Qwen3VLVideoSampling.from_config({})
    assert (default.min_pixels, default.max_pixels) == (128 * 32 * 32, 32 * 32 * 768)
    back = sampling_of(settings_of(s), Qwen3VLVideoSampling())  # the encoder's copy, from the wire
    assert back == s and type(back) is Qwen3VLVideoSampling
