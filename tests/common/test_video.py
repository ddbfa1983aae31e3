"""Video input: the torch-free sampling and resizing rule must equal transformers' Qwen2-VL video
processor, and the decoder must keep the right frames and refuse bad input with a clear message.

transformers' video processor module imports torchvision at the top, which this project does not
install, so the tests read the methods they compare against (`sample_frames`, `resize`,
`get_num_of_video_patches`, `smart_resize`) out of the installed source file and run that code as it
is, with torch, on a stand-in `self`. Test videos are encoded in memory with PyAV.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import math
import random
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.image_utils import SizeDict
from transformers.video_utils import VideoMetadata

from common.media import MediaError
from common.video import (
    _OPEN_OPTIONS,
    DecodedVideo,
    VideoLimits,
    decode_video,
    decode_video_data_uri,
    load_video_path,
    prepare_video,
    resize_frames,
)
from common.video_sampling import VideoSampling, torch_arange_int

REPO = Path(__file__).resolve().parents[2]


# --- transformers' own code, read from its source ---------------------------------------------------


def _processor_source() -> tuple[str, ast.Module]:
    spec = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    assert spec is not None and spec.origin, "transformers' Qwen2-VL video processor is not installed"
    source = Path(spec.origin).read_text(encoding="utf-8")
    return source, ast.parse(source)


def _segment(source: str, tree: ast.Module, name: str, cls: str | None = None) -> str:
    body = tree.body
    if cls is not None:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(source, node, padded=True) or ""


class _Base:
    def resize(self, image: Any, size: SizeDict, resample: Any) -> tuple[int, int]:
        return size.height, size.width  # the size transformers would resize to


def _transformers_processor() -> Any:
    """A stand-in `Qwen2VLVideoProcessor` whose methods are transformers' own source, run unchanged."""
    source, tree = _processor_source()
    methods = "".join(
        _segment(source, tree, name, "Qwen2VLVideoProcessor") + "\n"
        for name in ("sample_frames", "resize", "get_num_of_video_patches")
    )
    code = (
        "from __future__ import annotations\n"
        + _segment(source, tree, "smart_resize")
        + "\nclass Processor(_Base):\n"
        + methods
    )
    namespace: dict[str, Any] = {"math": math, "torch": torch, "SizeDict": SizeDict, "_Base": _Base}
    exec(compile(code, "video_processing_qwen2_vl.py", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def hf() -> Any:
    return _transformers_processor()


def _hf_indices(hf: Any, total: int, video_fps: float, s: VideoSampling) -> list[int]:
    proc = hf["Processor"]()
    proc.__dict__.update(
        num_frames=s.num_frames,
        fps=None if s.num_frames is not None else s.fps,
        temporal_patch_size=s.temporal_patch_size,
        min_frames=s.min_frames,
        max_frames=s.max_frames,
    )
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    return proc.sample_frames(metadata).tolist()


# --- sampling -----------------------------------------------------------------------------------------

TOTALS = [2, 3, 4, 5, 7, 8, 17, 30, 31, 60, 61, 100, 121, 240, 241, 1000, 1799, 1800, 7200, 16567, 50001]
VIDEO_FPS = [1.0, 2.0, 2.4, 23.976, 24.0, 25.0, 29.97, 30.0, 60.0, 120.0]
SETTINGS = [
    VideoSampling(),
    VideoSampling(fps=1.0, min_frames=8, max_frames=64),
    VideoSampling(fps=4.0, max_frames=16),
    VideoSampling(fps=0.5, min_frames=2, max_frames=768, temporal_patch_size=1),
    VideoSampling(fps=2.0, min_frames=4, max_frames=100, temporal_patch_size=3),
]


@pytest.mark.parametrize(
    "sampling",
    SETTINGS,
    ids=lambda s: f"fps{s.fps}-min{s.min_frames}-max{s.max_frames}-t{s.temporal_patch_size}",
)
def test_sample_frames_matches_transformers(hf: Any, sampling: VideoSampling) -> None:
    for total in TOTALS:
        if total < sampling.temporal_patch_size:
            continue  # transformers divides by zero there: see test_video_shorter_than_a_temporal_patch
        for video_fps in VIDEO_FPS:
            theirs = _hf_indices(hf, total, video_fps, sampling)
            ours = sampling.sample_frames(total, video_fps)
            # torch's arange can add an index equal to `total`, a frame that does not exist: dropped here
            assert ours == [i for i in theirs if i < total], (total, video_fps)


def test_fixed_num_frames_matches_transformers(hf: Any) -> None:
    for num_frames in (2, 3, 5, 8, 16, 33):
        sampling = VideoSampling(num_frames=num_frames)
        for total in (40, 41, 97, 1000):
            assert sampling.sample_frames(total, 30.0) == _hf_indices(hf, total, 30.0, sampling)
    with pytest.raises(ValueError, match="samples 8 frames but the video has only 5"):
        VideoSampling(num_frames=8).sample_frames(5, 30.0)


def test_arange_equals_torch_bit_for_bit() -> None:
    """torch rounds each value to float32 and starts each block of 8 lanes from a float32 base."""
    rng = random.Random(0)
    cases = [(t, n) for t in range(1, 400) for n in (1, 2, 3, 4, 6, 10, 14, 16, 17, 30, 31, 33, 64) if n <= t]
    cases += [(rng.randint(1000, 3_000_000), rng.randint(1, 768)) for _ in range(1500)]
    wrong = [(t, n) for t, n in cases if torch_arange_int(t, n) != torch.arange(0, t, t / n).int().tolist()]
    assert wrong == [], f"{len(wrong)} of {len(cases)} differ, first {wrong[:3]}"
    assert len(torch_arange_int(17, 14)) == 15  # the extra element, equal to total
    assert torch_arange_int(17, 14)[-1] == 17


def test_video_shorter_than_a_temporal_patch(hf: Any) -> None:
    """One frame: transformers' sampler fails; the frame is kept and repeated, as `patchify` pads."""
    sampling = VideoSampling()
    with pytest.raises(ZeroDivisionError):
        _hf_indices(hf, 1, 30.0, sampling)
    assert sampling.sample_frames(1, 30.0) == [0]
    assert sampling.padded_indices([0]) == [0, 0]
    assert sampling.padded_indices([0, 5, 9]) == [0, 5, 9, 9]
    assert sampling.grid_thw(1, 336, 336) == (1, 24, 24)


def test_second_per_grid_t_uses_the_sampled_rate() -> None:
    sampling = VideoSampling()
    for total, video_fps in ((90, 30.0), (1000, 29.97), (7, 2.0), (241, 24.0)):
        indices = sampling.sample_frames(total, video_fps)
        metadata = VideoMetadata(total_num_frames=total, fps=video_fps, frames_indices=indices)
        expected = sampling.temporal_patch_size / metadata.sampled_fps  # Qwen2_5_VLProcessor's formula
        assert sampling.second_per_grid_t(len(indices), total, video_fps) == expected
    assert sampling.second_per_grid_t(6, 90, 30.0) == 1.0  # 2 frames per patch at 2 fps


# --- resizing and the grid ----------------------------------------------------------------------------


def _random_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(1, 1), (10, 7), (28, 28), (70, 42), (336, 336), (1080, 1920), (2160, 3840), (30, 2500)]
    sizes += [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(count)]
    return [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200]


def test_smart_resize_matches_transformers(hf: Any) -> None:
    sampling = VideoSampling()
    for height, width in _random_sizes(2000):
        expected = hf["smart_resize"](height, width, 28, sampling.min_pixels, sampling.max_pixels)
        assert sampling.resized_size(8, height, width) == expected, (height, width)


@pytest.mark.parametrize("cap", [False, True])
def test_resize_matches_the_video_processor(hf: Any, cap: bool) -> None:
    sampling = VideoSampling(cap_pixels_per_frame=cap, max_video_tokens=16384)
    proc = hf["Processor"]()
    proc.max_video_tokens = sampling.max_video_tokens
    size = SizeDict(shortest_edge=sampling.min_pixels, longest_edge=sampling.max_pixels)
    for i, (height, width) in enumerate(_random_sizes(400, seed=1)):
        frames = (2, 4, 6, 64, 300, 768)[i % 6]
        video = SimpleNamespace(shape=(1, frames, 3, height, width))
        expected = proc.resize(video, size, None, factor=28, temporal_factor=2, cap_pixels_per_frame=cap)
        assert sampling.resized_size(frames, height, width) == expected, (frames, height, width)


def test_token_count_matches_get_num_of_video_patches(hf: Any) -> None:
    sampling = VideoSampling(min_pixels=28 * 28 * 4, max_pixels=448 * 448)
    proc = hf["Processor"]()
    proc.__dict__.update(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 448 * 448})
    proc.__dict__.update(patch_size=14, merge_size=2, temporal_patch_size=2)
    for i, (height, width) in enumerate(_random_sizes(300, seed=2)):
        frames = 1 + i % 9
        patches = proc.get_num_of_video_patches(frames, height, width, videos_kwargs={})
        assert sampling.num_tokens(frames, height, width) == patches // 4, (frames, height, width)


def test_from_config_reads_every_form() -> None:
    assert VideoSampling.from_config({}) == VideoSampling()
    v5 = VideoSampling.from_config({"size": {"shortest_edge": 3136, "longest_edge": 50176}, "fps": 1})
    legacy = VideoSampling.from_config(
        {"min_pixels": 3136, "max_pixels": 50176, "size": {"shortest_edge": 9}, "fps": 1.0}
    )
    old_size = VideoSampling.from_config({"size": {"min_pixels": 3136, "max_pixels": 50176}, "fps": 1.0})
    assert v5 == legacy == old_size == VideoSampling(fps=1.0, min_pixels=3136, max_pixels=50176)
    full = VideoSampling.from_config(
        {
            "min_frames": 2,
            "max_frames": 32,
            "temporal_patch_size": 2,
            "patch_size": 16,
            "merge_size": 2,
            "num_frames": 8,
            "cap_pixels_per_frame": True,
            "max_video_tokens": 4096,
            "do_sample_frames": False,
        }
    )
    assert (full.min_frames, full.max_frames, full.factor, full.num_frames) == (2, 32, 32, 8)
    assert full.cap_pixels_per_frame and full.max_video_tokens == 4096
    with pytest.raises(ValueError, match="fps must be positive"):
        VideoSampling(fps=0)


# --- decoding -----------------------------------------------------------------------------------------


def _frames(count: int, height: int, width: int) -> np.ndarray:
    """Smooth frames, each with its own colour, so a decoded frame can be told from its neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, ..., 0] = (x * 200 // max(width - 1, 1) + 20).astype(np.uint8)
        frames[i, ..., 1] = (y * 200 // max(height - 1, 1) + 20).astype(np.uint8)
        frames[i, ..., 2] = (37 * i) % 200 + 30
    return frames


def _encode(frames: np.ndarray, fps: float | Fraction, codec: str = "libx264", fmt: str = "mp4") -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _encode_audio(fmt: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=16000)
        samples = np.zeros((1, 16000), dtype=np.int16 if codec == "pcm_s16le" else np.float32)
        frame = av.AudioFrame.from_ndarray(
            samples, format="s16" if codec == "pcm_s16le" else "fltp", layout="mono"
        )
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _audio_with_cover_art() -> bytes:
    """AAC in MP4 with a cover picture, which FFmpeg lists as a (one-frame) video stream."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=16000)
        cover = container.add_stream("mjpeg", rate=1)
        cover.width = cover.height = 32
        cover.pix_fmt = "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 16000
        container.mux(audio.encode(samples))
        container.mux(audio.encode())
        picture = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        container.mux(cover.encode(picture.reformat(format="yuvj420p")))
        container.mux(cover.encode())
    return buffer.getvalue()


def _empty_container(fmt: str) -> bytes:
    buffer = io.BytesIO()
    container = av.open(buffer, "w", format=fmt)
    stream = container.add_stream("libx264", rate=2)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    return buffer.getvalue()


def test_decodes_a_four_frame_clip() -> None:
    source = _frames(4, 336, 336)
    video = decode_video(_encode(source, 2))
    assert (video.total_frames, video.video_fps, video.indices) == (4, 2.0, (0, 1, 2, 3))
    assert video.frames.shape == (4, 336, 336, 3) and video.frames.dtype == np.uint8
    error = np.abs(video.frames.astype(int) - source.astype(int))
    assert error.mean() < 2.0 and error.max() < 40, f"mean {error.mean():.2f}, max {error.max()}"
    prepared = prepare_video(video)
    assert prepared.grid_thw == (2, 24, 24)
    assert prepared.num_tokens == 2 * 24 * 24 // 4 == 288
    assert prepared.frames.shape == (4, 336, 336, 3)
    assert prepared.second_per_grid_t == 1.0


def test_keeps_the_sampled_frames_of_a_longer_clip() -> None:
    source = _frames(90, 64, 96)  # 3 s at 30 fps: 6 frames at 2 fps, every 15th
    video = decode_video(_encode(source, 30))
    assert video.indices == (0, 15, 30, 45, 60, 75)
    blues = video.frames[..., 2].mean(axis=(1, 2))
    expected = source[list(video.indices), 0, 0, 2].astype(float)
    assert np.abs(blues - expected).max() < 4, (blues, expected)


def test_pads_an_odd_frame_count_and_resizes() -> None:
    source = _frames(3, 100, 150)  # 3 frames: fewer than min_frames, floored to 2
    video = decode_video(_encode(source, 2))
    assert video.indices == (0, 1)
    sampling = VideoSampling(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    single = DecodedVideo(video.frames[:1], (0,), 1, 2.0)
    prepared = prepare_video(single, sampling)
    assert prepared.frames.shape == (2, 112, 140, 3)  # smart_resize(100, 150): 4 x 28 by 5 x 28
    assert np.array_equal(prepared.frames[0], prepared.frames[1])
    assert prepared.grid_thw == (1, 8, 10) and prepared.num_tokens == 20


def test_decodes_webm_vp9_without_a_frame_count_in_the_header() -> None:
    if "libvpx-vp9" not in av.codecs_available:
        pytest.skip("this FFmpeg build has no VP9 encoder")
    source = _frames(10, 64, 64)
    data = _encode(source, 5, codec="libvpx-vp9", fmt="webm")
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == 0  # no count in the header: the packets are counted
    video = decode_video(data)
    assert video.total_frames == 10 and video.indices == (0, 2, 5, 7)  # 2 s at 2 fps: arange(0, 10, 2.5)


def _rotated_mp4(data: bytes) -> bytes:
    """Write a 90-degree clockwise display matrix into the track header, as phones do for portrait."""
    out = bytearray(data)
    at = out.find(b"tkhd") + 4
    assert out[at] == 0, "version-0 tkhd expected"
    matrix = at + 4 + 5 * 4 + 8 + 4 * 2  # flags, times, id, reserved, duration, reserved, layer..volume
    out[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    return bytes(out)


def test_applies_the_display_rotation() -> None:
    source = np.zeros((4, 32, 64, 3), dtype=np.uint8)
    source[:, :, :16] = 255  # a white strip on the left
    video = decode_video(_rotated_mp4(_encode(source, 2)))
    assert video.frames.shape == (4, 64, 32, 3)  # portrait now
    top, bottom = video.frames[0, :16].mean(), video.frames[0, 16:].mean()
    assert top > 200 and bottom < 30, "turned clockwise, the left strip is on top"


# --- refusals -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip() -> bytes:
    return _encode(_frames(8, 64, 64), 2)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda clip: np.random.default_rng(0).bytes(5000), "cannot decode the video: Invalid data"),
        (lambda clip: clip[: len(clip) // 2], "cannot decode the video: Invalid data"),
        (lambda clip: b"", "the video is empty"),
        (lambda clip: _empty_container("mp4"), "the video has no frames"),
        (lambda clip: _empty_container("avi"), "the video has no frames"),
        (lambda clip: _encode_audio("mp4", "aac"), "no video stream, only audio"),
        (lambda clip: _encode_audio("wav", "pcm_s16le"), "no video stream, only audio"),
        (lambda clip: _audio_with_cover_art(), "no video stream, only audio"),
    ],
    ids=["random", "truncated", "empty", "mp4-zero-frames", "avi-zero-frames", "aac", "wav", "cover-art"],
)
def test_refuses_bad_input(clip: bytes, make: Any, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        decode_video(make(clip))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_refuses_other_formats(fmt: str) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, fmt)
    with pytest.raises(MediaError, match=r"not a supported video format \(send MP4"):
        decode_video(buffer.getvalue())


def test_refuses_a_video_over_the_duration_limit() -> None:
    data = _encode(_frames(47, 32, 32), Fraction(1, 2))  # 94 s at half a frame per second
    with pytest.raises(MediaError, match=r"the video lasts 94\.0 s, longer than the limit of 60 s"):
        decode_video(data)
    assert decode_video(data, limits=VideoLimits(max_seconds=100)).total_frames == 47


def test_refuses_what_is_over_the_other_limits(clip: bytes) -> None:
    with pytest.raises(MediaError, match=f"video is {len(clip)} bytes, limit is 1000"):
        decode_video(clip, limits=VideoLimits(max_bytes=1000))
    with pytest.raises(MediaError, match="video frames are 64x64, limit is 1000 pixels"):
        decode_video(clip, limits=VideoLimits(max_frame_pixels=1000))
    with pytest.raises(MediaError, match="more than 5 frames, the limit"):
        decode_video(clip, limits=VideoLimits(max_total_frames=5))
    with pytest.raises(MediaError, match="samples 16 frames but the video has only 8"):
        decode_video(clip, sampling=VideoSampling(num_frames=16))


def test_opens_no_other_file(tmp_path: Path, clip: bytes) -> None:
    """A playlist in the data must not make FFmpeg read a local file (or the network)."""
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(clip)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4,\nfile://{secret}\n#EXT-X-ENDLIST\n"
    concat = f"ffconcat version 1.0\nfile 'file:{secret}'\n"
    for data in (playlist, concat):
        with pytest.raises(MediaError, match="cannot decode the video|not a supported video format"):
            decode_video(data.encode())
    # The protocol list alone stops it too, even with the HLS demuxer forced (which does read the file
    # without it: the threat is real).
    with av.open(io.BytesIO(playlist.encode()), format="hls") as forced:
        assert sum(1 for packet in forced.demux() if packet.size) == 8
    only_protocols = {"protocol_whitelist": _OPEN_OPTIONS["protocol_whitelist"]}
    with pytest.raises(av.FFmpegError):
        av.open(io.BytesIO(playlist.encode()), format="hls", options=only_protocols)


def test_data_uri_and_path(tmp_path: Path, clip: bytes) -> None:
    import base64

    uri = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    assert decode_video_data_uri(uri).total_frames == 8
    with pytest.raises(MediaError, match="too long for the limit of 100 bytes"):
        decode_video_data_uri(uri, limits=VideoLimits(max_bytes=100))
    path = tmp_path / "inside" / "clip.mp4"
    path.parent.mkdir()
    path.write_bytes(clip)
    assert load_video_path(path, allowed_dirs=[path.parent]).total_frames == 8
    with pytest.raises(MediaError, match="outside the allowed folders"):
        load_video_path(path, allowed_dirs=[tmp_path / "elsewhere"])
    with pytest.raises(MediaError, match=f"video is {len(clip)} bytes, limit is 100"):
        load_video_path(path, limits=VideoLimits(max_bytes=100))
    with pytest.raises(MediaError, match="video file not found"):
        load_video_path(tmp_path / "missing.mp4")


# --- resize filter and imports ------------------------------------------------------------------------


def test_pil_bicubic_is_close_to_the_processors_torch_resize() -> None:
    """The processor resizes uint8 frames with torchvision (bicubic, antialias); torchvision computes
    that in float32 with torch's interpolate, then clamps and rounds, which is reproduced here."""
    frames = _frames(2, 480, 640)
    target = VideoSampling().resized_size(2, 480, 640)
    ours = resize_frames(frames, *target).astype(int)
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    theirs = F.interpolate(tensor, size=target, mode="bicubic", align_corners=False, antialias=True)
    theirs = theirs.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and diff.mean() < 0.05, f"max {diff.max()}, mean {diff.mean():.3f}"


def test_modules_do_not_import_torch() -> None:
    code = (
        "import common.video, common.video_sampling, sys; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
