"""Settings of the gateway's HTTP layer, checked once at start-up.

Every limit that protects the gateway from a client lives here with a safe default: requests come from
the network, so anything unbounded (image, video and audio bytes, pixels, counts, a video's or a clip's length, body size,
wall time) is a way to exhaust the process. Local image files are refused unless the operator names the folders they may come
from. Limits no deployment needs to tune (JSON nesting depth, the integer ranges the wire and the engine
hold) are constants in `gateway.request_limits` and `common.sampling_params`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.audio import DEFAULT_MAX_BYTES as DEFAULT_MAX_AUDIO_BYTES
from common.audio import DEFAULT_MAX_SECONDS as DEFAULT_MAX_AUDIO_SECONDS
from common.video import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    DEFAULT_MAX_SECONDS,
    DEFAULT_MAX_TOTAL_FRAMES,
    VideoLimits,
)

MiB = 1024 * 1024
MAX_AUDIO_SECONDS = 600.0  # the encoder's own bound (services/encode/media_items.py)


@dataclass(slots=True)
class GatewayConfig:
    model_dir: Path  # the checkpoint: tokenizer files, chat template, preprocessor config
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = ""  # the `model` clients must send; empty: the checkpoint folder's name
    max_images_per_request: int = 8
    max_image_bytes: int = 20 * MiB  # per image, encoded
    max_image_pixels: int = 4096 * 4096  # per image, width x height before any resize
    # videos (common.video.VideoLimits): checked on the container's header and packets, before any
    # frame is decoded; defaults are common.video's
    max_videos_per_request: int = 2
    # per video, encoded (32 MiB); a data URI must also fit in max_request_bytes (64 MiB holds 48 MiB)
    max_video_bytes: int = DEFAULT_MAX_BYTES
    max_video_seconds: float = DEFAULT_MAX_SECONDS  # per video (60 s)
    max_video_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS  # width x height of its frames (3840 x 2160)
    max_video_frames: int = DEFAULT_MAX_TOTAL_FRAMES  # frames in the file, before sampling (7200)
    # audio (common.audio): bytes before decoding, duration from the header and while decoding
    max_audios_per_request: int = 4
    max_audio_bytes: int = DEFAULT_MAX_AUDIO_BYTES  # per clip, encoded (25 MiB, OpenAI's upload limit)
    # per clip (30 s: Whisper's window, the most Qwen2-Audio's feature extractor keeps)
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    allowed_local_media_dirs: list[Path] = field(default_factory=list)  # empty: no local paths at all
    max_request_bytes: int = 64 * MiB  # whole JSON body; larger bodies get 413
    request_timeout_s: float | None = 600.0  # arrival to last token; None: no deadline
    default_max_tokens: int | None = None  # when a request names none; None: the rest of the context
    preprocess_threads: int = 4  # threads decoding images and tokenizing prompts off the event loop
    # Prompt text may hold this many characters per token of the context (max_model_len); longer text
    # is refused before it is tokenized, since tokenizing costs hundreds of bytes per character.
    # English averages about 4 characters a token and code about 3; 16 leaves room for long runs of
    # whitespace or symbols, and bounds the text of a 32768-token context to 524288 characters.
    max_prompt_chars_per_token: int = 16
    api_key: str | None = None  # clients send `Authorization: Bearer <api_key>` on /v1 routes; None: open
    # connection limits (enforced by gateway.connection_limits and the body read in gateway.app)
    header_timeout_s: float = 10.0  # a connection's first request head; a later one from its first byte
    body_timeout_s: float = 30.0  # a request's body, from its complete head; 408 after
    keepalive_timeout_s: float = 15.0  # an idle connection: no new request this long after the last
    max_connections: int = 4096  # open client connections; more are answered 503 and closed

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir).expanduser()
        if not self.model_dir.is_dir():
            raise ValueError(f"model_dir {self.model_dir} is not a folder")
        if not self.served_model_name:
            self.served_model_name = self.model_dir.resolve().name
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in (
            "max_images_per_request",
            "max_image_bytes",
            "max_image_pixels",
            "preprocess_threads",
            "max_prompt_chars_per_token",
            "max_videos_per_request",
            "max_video_bytes",
            "max_video_frame_pixels",
            "max_video_frames",
            "max_audios_per_request",
            "max_audio_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_request_bytes < self.max_image_bytes * 4 // 3 + 1024:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must hold one base64 image of "
                f"max_image_bytes ({self.max_image_bytes})"
            )
        if not self.max_video_seconds > 0:
            raise ValueError(f"max_video_seconds must be positive, got {self.max_video_seconds}")
        if not 0 < self.max_audio_seconds <= MAX_AUDIO_SECONDS:
            raise ValueError(
                f"max_audio_seconds must be in (0, {MAX_AUDIO_SECONDS:g}], got {self.max_audio_seconds}"
            )
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive or None, got {self.request_timeout_s}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1 or None, got {self.default_max_tokens}")
        self.allowed_local_media_dirs = [_folder(d) for d in self.allowed_local_media_dirs]
        _check_connection_limits(self)


def video_limits(config: GatewayConfig) -> VideoLimits:
    return VideoLimits(
        max_bytes=config.max_video_bytes,
        max_seconds=config.max_video_seconds,
        max_frame_pixels=config.max_video_frame_pixels,
        max_total_frames=config.max_video_frames,
    )


def _folder(path: str | os.PathLike[str]) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise ValueError(f"allowed local media folder {path} does not exist")
    return resolved


def _check_connection_limits(config: GatewayConfig) -> None:
    for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if config.max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {config.max_connections}")
