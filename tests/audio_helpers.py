"""Test audio made in memory: a tone with a little noise, as samples or as an encoded file."""

from __future__ import annotations

import io

import numpy as np


def tone(seconds: float, rate: int = 16_000, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """Mono float32: a sine at `freq` plus quiet noise, so every mel band holds something."""
    n = int(round(seconds * rate))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def wav_bytes(
    seconds: float, rate: int = 16_000, channels: int = 1, seed: int = 0, fmt: str = "WAV"
) -> bytes:
    """A 16-bit PCM file (WAV by default; "FLAC", "OGG" work too) of `tone`, in memory."""
    import soundfile as sf

    mono = tone(seconds, rate, seed=seed)
    data = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype="PCM_16" if fmt != "OGG" else "VORBIS")
    return buf.getvalue()
