"""Video input: decode untrusted video bytes into the sampled RGB frames, with clear errors.

Videos arrive from clients, so every limit is checked before the step it protects: the byte size
before the container is opened, the duration and frame size from the container's header before any
packet is read, the frame count after demuxing (packets are compressed, so that is cheap) and before
any frame is decoded. Frames are then decoded in order and only the sampled ones are converted and
kept, so memory holds the compressed data plus the sampled frames, never the whole video decoded. Everything
happens in memory: no temporary files, and FFmpeg may open no other file or URL (a playlist inside
the data would otherwise make it read local files or the network).

Each failure is a `MediaError` (a `ValueError`) whose message can go back to the client as a 400. No
torch here: the gateway imports this. Decoding is CPU-bound; call it from a worker thread.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from PIL import Image

from common.media import MediaError, decode_data_uri, read_local_file
from common.video_sampling import VideoSampling

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_SECONDS = 60.0
DEFAULT_MAX_FRAME_PIXELS = 3840 * 2160
DEFAULT_MAX_TOTAL_FRAMES = 60 * 120  # a minute at 120 fps: bounds the decoding work
# Demuxers FFmpeg may pick (the names are FFmpeg's): video containers, plus audio-only ones so that
# an audio file is refused as "no video stream" rather than as an unknown format.
ALLOWED_FORMATS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "wav", "mp3", "ogg", "flac", "aac")
SUPPORTED_FORMATS = "MP4, MOV, WebM, MKV, AVI or MPEG-TS"
# "none" names no protocol, so any nested open (HLS segments, concat entries, file: URLs) is refused.
_OPEN_OPTIONS = {"format_whitelist": ",".join(ALLOWED_FORMATS), "protocol_whitelist": "none"}


@dataclass(frozen=True, slots=True)
class VideoLimits:
    """What one video may cost; the gateway sets these from its configuration."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    max_total_frames: int = DEFAULT_MAX_TOTAL_FRAMES


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    """The sampled frames of one video, upright, as RGB uint8 [T, H, W, 3], and where they came from."""

    frames: np.ndarray
    indices: tuple[int, ...]
    total_frames: int
    video_fps: float

    @property
    def duration(self) -> float:
        return self.total_frames / self.video_fps


@dataclass(frozen=True, slots=True)
class PreparedVideo:
    """Frames resized and padded for the encoder, with the grid and token count the prompt needs."""

    frames: np.ndarray
    grid_thw: tuple[int, int, int]
    num_tokens: int
    second_per_grid_t: float


@dataclass(frozen=True, slots=True)
class VideoProbe:
    """What the frame plan needs, read without decoding the video: its frame count and rate, and the
    size of its frames once upright (the first frame's, which every sampled frame is converted to)."""

    total_frames: int
    video_fps: float
    width: int
    height: int


def decode_video(
    data: bytes, *, sampling: VideoSampling | None = None, limits: VideoLimits | None = None
) -> DecodedVideo:
    """Decode video bytes and keep the frames `sampling` picks (Qwen2-VL's rule, at 2 fps by default)."""
    sampling = sampling or VideoSampling()
    return _with_container(data, limits or VideoLimits(), lambda c, lim: _decode(c, sampling, lim))


def probe_video(data: bytes, *, limits: VideoLimits | None = None) -> VideoProbe:
    """Every check `decode_video` makes before decoding, then the first frame only.

    The gateway plans the frames and counts the tokens from this (milliseconds for a short clip),
    leaving the decoding of the sampled frames to the encoder. Decoding the first frame proves the
    stream decodes at all and gives the size after the display rotation.
    """
    return _with_container(data, limits or VideoLimits(), _probe)


def _with_container(data: bytes, limits: VideoLimits, run: Any) -> Any:
    """Open `data` under the format and protocol whitelists and run `run(container, limits)`."""
    if not data:
        raise MediaError("the video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise MediaError(f"video is {len(data)} bytes, limit is {limits.max_bytes}")
    try:
        container = av.open(io.BytesIO(data), options=dict(_OPEN_OPTIONS))
    except av.error.ArgumentError:  # FFmpeg recognised the data, as a format not on the list
        raise MediaError(f"not a supported video format (send {SUPPORTED_FORMATS})") from None
    except av.FFmpegError as exc:
        raise MediaError(f"cannot decode the video: {_reason(exc)}") from None
    try:
        with container:
            return run(container, limits)
    except av.FFmpegError as exc:
        raise MediaError(f"cannot decode the video: {_reason(exc)}") from None


def decode_video_data_uri(
    uri: str, *, sampling: VideoSampling | None = None, limits: VideoLimits | None = None
) -> DecodedVideo:
    """Decode a `data:video/...;base64,...` URI; the byte limit is checked before base64 decoding."""
    limits = limits or VideoLimits()
    return decode_video(decode_data_uri(uri, max_bytes=limits.max_bytes), sampling=sampling, limits=limits)


def load_video_path(
    path: str | os.PathLike[str],
    *,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None = None,
    sampling: VideoSampling | None = None,
    limits: VideoLimits | None = None,
) -> DecodedVideo:
    """Load a local video file under `media.read_local_file`'s rules (`None`: no restriction, for
    local tools; an empty list allows nothing)."""
    limits = limits or VideoLimits()
    data = read_local_file(path, allowed_dirs=allowed_dirs, max_bytes=limits.max_bytes, kind="video")
    return decode_video(data, sampling=sampling, limits=limits)


def prepare_video(video: DecodedVideo, sampling: VideoSampling | None = None) -> PreparedVideo:
    """Resize the sampled frames as the video processor does and pad them to whole temporal patches."""
    sampling = sampling or VideoSampling()
    count, height, width = video.frames.shape[:3]
    try:
        size = sampling.resized_size(count, height, width)
    except ValueError as exc:  # an aspect ratio over 200
        raise MediaError(f"video frames of {width}x{height} cannot be used: {exc}") from None
    frames = resize_frames(video.frames, *size)
    pad = -count % sampling.temporal_patch_size
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    return PreparedVideo(
        frames=frames,
        grid_thw=sampling.grid_thw(count, height, width),
        num_tokens=sampling.num_tokens(count, height, width),
        second_per_grid_t=sampling.second_per_grid_t(count, video.total_frames, video.video_fps),
    )


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize RGB uint8 [T, H, W, 3] frames with PIL's bicubic filter.

    The video processor resizes with torchvision (bicubic, antialiased), which PIL's filter
    approximates: PIL rounds and clips to uint8 between its horizontal and vertical passes, torch does
    not, so a few pixels near sharp edges differ by several levels (docs/video.md has the numbers).
    """
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
    return out


def _scan(
    container: av.container.InputContainer, limits: VideoLimits
) -> tuple[av.VideoStream, list[av.Packet], float]:
    """The video stream, its packets and frame rate, every limit checked: no pixel decoded yet."""
    stream = _video_stream(container)
    _check_header(container, stream, limits)
    packets = _demux(container, stream, limits)
    video_fps = _frame_rate(container, stream, len(packets))
    if len(packets) / video_fps > limits.max_seconds:
        raise MediaError(_too_long(len(packets) / video_fps, limits.max_seconds))
    return stream, packets, video_fps


def _probe(container: av.container.InputContainer, limits: VideoLimits) -> VideoProbe:
    stream, packets, video_fps = _scan(container, limits)
    first = next(_frames(stream, packets), None)
    if first is None:
        raise MediaError(f"cannot decode the video: it ends after 0 of {len(packets)} frames")
    width, height = first.width, first.height
    if round(first.rotation / 90) % 2:  # a quarter turn swaps the sides
        width, height = height, width
    return VideoProbe(len(packets), video_fps, width, height)


def _decode(
    container: av.container.InputContainer, sampling: VideoSampling, limits: VideoLimits
) -> DecodedVideo:
    stream, packets, video_fps = _scan(container, limits)
    try:
        indices = sampling.sample_frames(len(packets), video_fps)
    except ValueError as exc:  # a fixed num_frames larger than the video
        raise MediaError(str(exc)) from None
    frames = _decode_frames(stream, packets, indices)
    return DecodedVideo(np.stack(frames), tuple(indices), len(packets), video_fps)


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    """The first real video stream: an audio file's cover art is a one-picture "video" stream."""
    cover = av.stream.Disposition.attached_pic | av.stream.Disposition.timed_thumbnails
    streams = [s for s in container.streams.video if not s.disposition & cover]
    if streams:
        return streams[0]
    if container.streams.audio:
        raise MediaError("the file has no video stream, only audio")
    raise MediaError("the video has no frames")


def _check_header(
    container: av.container.InputContainer, stream: av.VideoStream, limits: VideoLimits
) -> None:
    """Refuse from the header alone what is too long or too large, before reading any packet."""
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    if seconds is not None and seconds > limits.max_seconds:
        raise MediaError(_too_long(seconds, limits.max_seconds))
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_frame_pixels:
        raise MediaError(f"video frames are {width}x{height}, limit is {limits.max_frame_pixels} pixels")
    # The decoder refuses larger frames itself, should the size change inside the stream.
    stream.codec_context.options = {"max_pixels": str(limits.max_frame_pixels)}


def _demux(
    container: av.container.InputContainer, stream: av.VideoStream, limits: VideoLimits
) -> list[av.Packet]:
    """The video packets, one per frame; their count is the video's frame count."""
    packets = []
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:  # the end-of-stream marker; edit-list cuts
            continue
        packets.append(packet)
        if len(packets) > limits.max_total_frames:
            raise MediaError(f"the video has more than {limits.max_total_frames} frames, the limit")
    if not packets:
        raise MediaError("the video has no frames")
    return packets


def _frame_rate(container: av.container.InputContainer, stream: av.VideoStream, total: int) -> float:
    """Frames per second: the stream's average rate (what transformers reads), else FFmpeg's guess."""
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return float(rate)
    if container.duration:
        return total / (container.duration / av.time_base)
    raise MediaError("cannot decode the video: its frame rate is unknown")


def _decode_frames(stream: av.VideoStream, packets: list[av.Packet], indices: list[int]) -> list[np.ndarray]:
    """Decode in order, converting only the sampled frames, and stop after the last one."""
    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    size: tuple[int, int] | None = None
    decoded = 0
    for frame in _frames(stream, packets):
        if decoded in wanted:
            size = size or (frame.width, frame.height)  # index 0 is always sampled
            rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
            kept[decoded] = _upright(rgb, frame.rotation)
            if len(kept) == len(wanted):
                break
        decoded += 1
    if len(kept) < len(wanted):
        raise MediaError(f"cannot decode the video: it ends after {decoded} of {len(packets)} frames")
    return [kept[i] for i in indices]


def _frames(stream: av.VideoStream, packets: list[av.Packet]) -> Iterator[av.VideoFrame]:
    codec = stream.codec_context
    for packet in packets:
        yield from codec.decode(packet)
    yield from codec.decode(None)  # flush the frames the decoder still holds


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the display rotation (phones store portrait video sideways), as a player would.

    FFmpeg gives the angle counterclockwise; `np.rot90` turns counterclockwise too.
    """
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _too_long(seconds: float, limit: float) -> str:
    return f"the video lasts {seconds:.1f} s, longer than the limit of {limit:g} s"


def _reason(exc: av.FFmpegError) -> str:
    return exc.strerror or str(exc)
