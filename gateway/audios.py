"""Audio parts of a request: fetch the bytes, decode them within the limits, count the audio tokens.

Unlike a video, a clip is decoded here in full: decoding is cheap (about 0.1 s for 30 s of 48 kHz
stereo on one core, in the preprocessing worker thread, never on the event loop), and the token count
depends on the exact number of 16 kHz samples, which only decoding gives (MP3 and ADTS headers do not
record the length exactly). Decoding here also turns a corrupt, empty, too long or too short clip into
a 400 now rather than an encoder's error after routing.

What travels to the encoder is the bytes as received, not the samples: they are usually far smaller
(30 s of float32 samples is 1.9 MB), and the encoder decodes them again with the same code, cut to the
same duration (`max_seconds` travels with the item), so it finds the same length. The cache key covers
the bytes and what shapes the features from them: the sampling rate and that cut
(`common.hashing.context_hash`, so a clip never shares a key with an image of the same bytes).

Sources: `input_audio` objects (`{"data": <base64>, "format": "wav"}`, OpenAI's part) and `audio_url`
URLs (vLLM's part): `data:` URIs, or local files inside the folders the operator allowed, as for images
(common/audio_sources.py). Remote http(s) URLs are refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.audio import decode_audio
from common.audio_features import AudioGeometry
from common.audio_sources import audio_url_bytes, input_audio_bytes
from common.hashing import context_hash
from common.media import MediaError
from gateway.backend import ImageInput
from gateway.errors import bad_request


def audio_key(data: bytes, sampling_rate: int, max_seconds: float) -> str:
    """The embedding-cache key of a clip: its bytes, and the decoding that made its features."""
    context = {"kind": "audio", "sampling_rate": sampling_rate, "max_seconds": max_seconds}
    return context_hash(json.dumps(context, sort_keys=True, separators=(",", ":")).encode(), data)


class AudioLoader:
    def __init__(
        self,
        geometry: AudioGeometry,
        *,
        max_bytes: int,
        max_seconds: float,
        allowed_dirs: Sequence[Path] = (),
    ) -> None:
        self.geometry = geometry
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.allowed_dirs = [Path(d).resolve() for d in allowed_dirs]

    def load(self, source: Any, param: str) -> ImageInput:
        """The bytes, token count and cache key of one clip; a 400 naming `param` when unusable.

        `source` is an `input_audio` object or an `audio_url` URL (gateway.content_parts)."""
        try:
            if isinstance(source, dict):
                data, declared = input_audio_bytes(source, max_bytes=self.max_bytes)
            else:
                data, declared = (
                    audio_url_bytes(source, allowed_dirs=self.allowed_dirs, max_bytes=self.max_bytes),
                    None,
                )
            samples = decode_audio(
                data, declared_format=declared, sampling_rate=self.geometry.sampling_rate,
                max_bytes=self.max_bytes, max_seconds=self.max_seconds,
            )  # fmt: skip
            tokens = self.geometry.num_tokens(len(samples))
            if tokens < 1:
                shortest = 2 * self.geometry.hop_length / self.geometry.sampling_rate
                raise MediaError(
                    f"audio is too short: {len(samples)} samples at {self.geometry.sampling_rate} Hz give no "
                    f"audio token (send more than {shortest:g} s)"
                )
        except (MediaError, ValueError) as exc:
            raise bad_request(f"{param}: {exc}", param=param) from None
        return ImageInput(
            hash=audio_key(data, self.geometry.sampling_rate, self.max_seconds),
            data=data,
            width=0,
            height=0,
            grid_thw=(1, 1, tokens),
            num_tokens=tokens,
            kind="audio",
            max_seconds=self.max_seconds,
        )
