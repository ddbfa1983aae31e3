"""Synthetic videos and audio clips for the bench workload, made in memory, the same for the same seed.

Videos are H.264 MP4s at `VIDEO_FPS` frames per second. Their frames are not noise: noise compresses
so badly that a 10 s clip would be megabytes, and the gateway would spend its time on base64 and
demuxing rather than what the bench measures. Each clip is instead a few smooth sine gradients whose
frequencies, phases and drift speeds come from the clip's seed: every frame differs, every clip
differs (so no two share a content hash), and a 224x224 second is a few kilobytes. Audio clips are
mono 16 kHz 16-bit WAVs: a tone at a seeded pitch plus quiet noise, so every mel band holds something.

The bounds are the gateway's defaults (`common/video.py`, `common/audio.py`): at most 60 s of video,
30 s of audio. A clip is at least two frames (one temporal patch of Qwen2-VL) and frames are even
sized (yuv420p needs that). Encoded clips are cached per (size, seconds, seed), so a workload built
again (another topology, the warm-up) costs no second encode.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

VIDEO_FPS = 4
MIN_VIDEO_SECONDS, MAX_VIDEO_SECONDS = 0.5, 60.0  # 0.5 s at 4 fps: two frames
MIN_VIDEO_SIDE, MAX_VIDEO_PIXELS = 16, 3840 * 2160
AUDIO_RATE = 16_000
MIN_AUDIO_SECONDS, MAX_AUDIO_SECONDS = 0.1, 30.0


def video_problem(width: int, height: int, seconds: float) -> str | None:
    """Why a video of this shape cannot be made (or would be refused by the gateway), or None."""
    if width < MIN_VIDEO_SIDE or height < MIN_VIDEO_SIDE or width % 2 or height % 2:
        return f"video size {width}x{height}: both sides even and at least {MIN_VIDEO_SIDE}"
    if width * height > MAX_VIDEO_PIXELS:
        return f"video size {width}x{height}: at most {MAX_VIDEO_PIXELS} pixels (3840x2160)"
    if not MIN_VIDEO_SECONDS <= seconds <= MAX_VIDEO_SECONDS:
        return f"video seconds {seconds:g}: from {MIN_VIDEO_SECONDS:g} to {MAX_VIDEO_SECONDS:g}"
    return None


def audio_problem(seconds: float) -> str | None:
    """Why an audio clip this long cannot be sent, or None."""
    if not MIN_AUDIO_SECONDS <= seconds <= MAX_AUDIO_SECONDS:
        return f"audio seconds {seconds:g}: from {MIN_AUDIO_SECONDS:g} to {MAX_AUDIO_SECONDS:g}"
    return None


def video_frame_count(seconds: float) -> int:
    return max(2, round(seconds * VIDEO_FPS))


def gradient_frames(width: int, height: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """`count` (height, width, 3) uint8 frames: per channel a drifting sine gradient, seeded.

    sin(a(x) + b(y) + drift * t) is split as sin(a + drift * t) cos(b) + cos(a + drift * t) sin(b), so
    a frame is two outer products per channel rather than a sine per pixel.
    """
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.3, 1.5, (2, 3))  # periods across the frame, per axis and channel
    phase = rng.uniform(0.0, 2 * np.pi, 3)
    drift = rng.uniform(0.1, 0.6, 3)  # radians per frame
    across = 2 * np.pi * freq[0] * (np.arange(width) / width)[:, None] + phase  # (width, 3)
    down = 2 * np.pi * freq[1] * (np.arange(height) / height)[:, None]  # (height, 3)
    cos_down = (100 * np.cos(down)).astype(np.float32)[:, None, :]
    sin_down = (100 * np.sin(down)).astype(np.float32)[:, None, :]
    for i in range(count):
        shifted = across + drift * i
        wave = np.sin(shifted).astype(np.float32)[None] * cos_down
        wave += np.cos(shifted).astype(np.float32)[None] * sin_down
        wave += 127.5
        yield wave.astype(np.uint8)


@functools.lru_cache(maxsize=64)
def mp4_clip(width: int, height: int, seconds: float, seed: int) -> bytes:
    """An H.264 MP4 of `video_frame_count(seconds)` gradient frames at `VIDEO_FPS`."""
    import av

    problem = video_problem(width, height, seconds)
    if problem:
        raise ValueError(problem)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(VIDEO_FPS))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for frame in gradient_frames(width, height, video_frame_count(seconds), seed):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@functools.lru_cache(maxsize=64)
def wav_clip(seconds: float, seed: int) -> bytes:
    """A mono 16 kHz 16-bit WAV of round(seconds * 16000) samples: a seeded tone plus quiet noise."""
    import soundfile as sf

    problem = audio_problem(seconds)
    if problem:
        raise ValueError(problem)
    rng = np.random.default_rng(seed)
    n = round(seconds * AUDIO_RATE)
    t = np.arange(n) / AUDIO_RATE
    freq, phase = rng.uniform(150.0, 2000.0), rng.uniform(0.0, 2 * np.pi)
    samples = 0.3 * np.sin(2 * np.pi * freq * t + phase) + 0.05 * rng.standard_normal(n)
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), AUDIO_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def video_data_uri(width: int, height: int, seconds: float, seed: int) -> str:
    return "data:video/mp4;base64," + base64.b64encode(mp4_clip(width, height, seconds, seed)).decode("ascii")


def audio_base64(seconds: float, seed: int) -> str:
    """The `input_audio.data` of a clip (plain base64; its format is "wav")."""
    return base64.b64encode(wav_clip(seconds, seed)).decode("ascii")
