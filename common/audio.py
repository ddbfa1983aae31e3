"""Audio input: decode untrusted bytes into mono float32 at the model's rate (where the bytes come
from, content parts and files: `common.audio_sources`).

Clients send audio as OpenAI's `{"type": "input_audio", "input_audio": {"data": <base64>, "format":
"wav"}}` or vLLM's `{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}`. Each
limit is checked before the step it protects: the byte size before decoding, the length recorded in
the header before the samples are decoded, and the decoded length while decoding (decoding stops just
past the limit). The container is recognised from the bytes themselves and the matching decoder is
named explicitly (soundfile for WAV, FLAC and Ogg; PyAV's FFmpeg for MP3, MP4/M4A, ADTS AAC and
WebM), so FFmpeg never guesses a demuxer from hostile data. Everything happens in memory.

Every failure is a `MediaError` (a `ValueError`) whose message can go back to the client as a 400.
No torch here: the gateway imports this.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterable, Iterator

import av
import numpy as np
import soundfile as sf

from common.media import MediaError

DEFAULT_SAMPLING_RATE = 16_000  # WhisperFeatureExtractor's
DEFAULT_MAX_BYTES = 25 * 1024 * 1024  # OpenAI's limit for audio uploads
DEFAULT_MAX_SECONDS = 30.0  # Whisper's window: the feature extractor cuts anything longer
# Rates and channel counts outside these are broken or hostile headers, not speech.
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1_000, 384_000
MAX_CHANNELS = 8
# FFmpeg's lossy decoders may keep the silence a codec adds around the signal (AAC primes 1024 or
# 2112 samples and pads up to 1024): a clip cut to exactly max_seconds decodes a little longer, so
# this much is tolerated there, then cut off. libsndfile trims Vorbis and Opus to the recorded length.
CODEC_SLACK_SAMPLES = 4096
# libswresample with twice its default filter length (32 taps): going to 16 kHz, a 7 kHz tone keeps
# its level and an 8.5 kHz one (past the new Nyquist frequency) is about 90 dB down; 32 taps give
# -0.4 dB and -26 dB.
_FILTER_SIZE = 64
RESAMPLER_OPTIONS = {"filter_size": str(_FILTER_SIZE)}

# The container each `input_audio.format` may name; the bytes decide which decoder runs.
DECLARED_FORMATS: dict[str, tuple[str, ...]] = {
    "wav": ("wav",),
    "flac": ("flac",),
    "ogg": ("ogg",),
    "opus": ("ogg", "webm"),
    "mp3": ("mp3",),
    "m4a": ("mp4",),
    "mp4": ("mp4",),
    "aac": ("aac", "mp4"),
    "webm": ("webm",),
}
_SOUNDFILE_CONTAINERS = ("wav", "flac", "ogg")
_FFMPEG_DEMUXERS = {"mp3": "mp3", "mp4": "mp4", "aac": "aac", "webm": "matroska", "flac": "flac"}
# Where FFmpeg's duration is the recorded one; for MP3 and ADTS it may be estimated from the bitrate.
_EXACT_LENGTH_CONTAINERS = ("mp4", "webm")
_BLOCK_FRAMES = 16_384


def decode_audio(
    data: bytes,
    *,
    declared_format: str | None = None,
    sampling_rate: int = DEFAULT_SAMPLING_RATE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Decode audio bytes to mono float32 samples in [-1, 1] at `sampling_rate`.

    Channels are averaged (as librosa's `to_mono`), then resampled with libswresample; the result has
    `ceil(n * sampling_rate / source_rate)` samples, librosa's length rule, cut to `max_seconds`.
    `declared_format` (the `input_audio.format` field) must agree with what the bytes are.
    """
    if len(data) > max_bytes:
        raise MediaError(f"audio is {len(data)} bytes, limit is {max_bytes}")
    if not data:
        raise MediaError("audio is empty (0 bytes)")
    container = sniff_container(data)
    if container is None:
        raise MediaError(f"not a supported audio format (supported: {', '.join(DECLARED_FORMATS)})")
    if declared_format is not None:
        check_declared_format(declared_format, container)
    if _soundfile_reads(data, container):
        mono, rate = _decode_soundfile(data, container, max_seconds)
    else:
        mono, rate = _decode_ffmpeg(data, container, max_seconds)
    if mono.size == 0:
        raise MediaError("audio has no samples (the file is empty or truncated)")
    if not np.isfinite(mono).all():
        raise MediaError("audio contains NaN or infinite samples")
    out = resample(mono, rate, sampling_rate)[: int(max_seconds * sampling_rate)]
    return np.clip(out, -1.0, 1.0, out=out)


def sniff_container(data: bytes) -> str | None:
    """The container the bytes are, from their first bytes (None when it is none we decode).

    An ID3v2 tag is taken to start an MP3, the format that carries one in practice. An MPEG frame sync
    with layer bits 00 is ADTS AAC; any other layer is MPEG audio (MP3).
    """
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: WebM and Matroska
        return "webm"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "aac" if head[1] & 0x06 == 0 else "mp3"
    return None


def check_declared_format(declared: str, container: str) -> None:
    """Refuse an `input_audio.format` that is unknown or that the bytes contradict.

    The bytes pick the decoder either way; a mismatch is refused rather than decoded because it
    usually means the client attached the wrong file or mislabelled it, and a 400 says so at once.
    """
    if container not in declared_containers(declared):
        raise MediaError(f"input_audio.format is {declared!r} but the data is {container} audio")


def declared_containers(declared: str) -> tuple[str, ...]:
    allowed = DECLARED_FORMATS.get(declared.lower())
    if allowed is None:
        raise MediaError(
            f"input_audio.format {declared!r} is not supported (supported: {', '.join(DECLARED_FORMATS)})"
        )
    return allowed


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 `samples` at `target_rate`, `ceil(n * target / source)` of them (librosa's rule).

    The input is followed by enough zeros to flush the filter: libswresample holds back about a filter
    length of output until more input or the end arrives, and without the zeros short clips come
    out shorter than the rule, or empty.
    """
    if source_rate == target_rate:
        return samples.astype(np.float32, copy=True)
    length = -(-len(samples) * target_rate // source_rate)
    flush = 2 * _FILTER_SIZE * -(-source_rate // target_rate) + 64
    padded = np.concatenate([samples.astype(np.float32), np.zeros(flush, np.float32)])
    frame = av.AudioFrame.from_ndarray(padded[np.newaxis, :], format="flt", layout="mono")
    frame.sample_rate = source_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate, options=RESAMPLER_OPTIONS)
    pieces = [out.to_ndarray()[0] for out in [*resampler.resample(frame), *resampler.resample(None)]]
    out = np.concatenate(pieces)[:length] if pieces else np.zeros(0, np.float32)
    return np.pad(out, (0, length - len(out)))  # never needed with the flush; kept as a guarantee


def _soundfile_reads(data: bytes, container: str) -> bool:
    """Whether libsndfile decodes these bytes: WAV, Ogg and FLAC go to it, with one exception.

    A FLAC whose STREAMINFO leaves the length out (0, as some streaming encoders write it) makes
    libsndfile fail at the end of the stream; FFmpeg reads it.
    """
    if container != "flac":
        return container in _SOUNDFILE_CONTAINERS
    return len(data) < 26 or int.from_bytes(data[21:26], "big") & (2**36 - 1) != 0


def _decode_soundfile(data: bytes, container: str, max_seconds: float) -> tuple[np.ndarray, int]:
    if container == "wav":
        _check_wav_complete(data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as audio:
            rate = audio.samplerate
            limit = _check_stream(rate, audio.channels, audio.frames, max_seconds, slack=0)
            blocks = audio.blocks(_BLOCK_FRAMES, dtype="float32", always_2d=True, frames=limit + 1)
            return _collect((block.mean(axis=1) for block in blocks), limit, max_seconds), rate
    except sf.SoundFileError as exc:
        message = (getattr(exc, "error_string", None) or str(exc)).removeprefix("Error : ")
        raise MediaError(f"{container} audio is corrupt or truncated: {message}") from None


def _check_wav_complete(data: bytes) -> None:
    """Refuse a WAV whose data chunk holds fewer bytes than its header says.

    libsndfile reads such a file without complaint, up to where the bytes stop, so a cut upload would
    pass as shorter audio. A size of 0 or 0xFFFFFFFF means "unknown" (streaming writers, RF64).
    """
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"data":
            present = len(data) - offset - 8
            if size not in (0, 0xFFFFFFFF) and present < size:
                raise MediaError(
                    f"wav audio is truncated: its header gives {size} bytes of samples, {present} are present"
                )
            return
        offset += 8 + size + (size & 1)  # chunks are padded to an even length


def _decode_ffmpeg(data: bytes, container: str, max_seconds: float) -> tuple[np.ndarray, int]:
    try:
        with av.open(io.BytesIO(data), format=_FFMPEG_DEMUXERS[container], metadata_errors="ignore") as media:
            if not media.streams.audio:
                raise MediaError(f"{container} file has no audio stream")
            stream = media.streams.audio[0]
            if stream.codec_context is None:  # the header names a codec this FFmpeg cannot decode
                raise MediaError(f"{container} audio uses a codec that is not supported")
            rate = stream.sample_rate
            header_frames = None
            if container in _EXACT_LENGTH_CONTAINERS and media.duration is not None:
                header_frames = media.duration * rate / av.time_base
            slack = 0 if container == "flac" else CODEC_SLACK_SAMPLES
            limit = _check_stream(rate, stream.channels, header_frames, max_seconds, slack=slack)
            return _collect(_ffmpeg_mono(media.decode(stream), rate), limit, max_seconds), rate
    except av.FFmpegError as exc:
        raise MediaError(f"{container} audio is corrupt or truncated: {exc.strerror or exc}") from None


def _ffmpeg_mono(frames: Iterator[av.AudioFrame], rate: int) -> Iterator[np.ndarray]:
    """Each decoded frame as float32 mono, whatever its sample format and layout."""
    for frame in frames:
        if frame.sample_rate != rate:
            raise MediaError(f"audio changes sample rate mid-stream ({rate} Hz to {frame.sample_rate} Hz)")
        channels = frame.layout.nb_channels
        if not 1 <= channels <= MAX_CHANNELS:
            raise MediaError(f"audio has {channels} channels, limit is {MAX_CHANNELS}")
        array = frame.to_ndarray()
        if not frame.format.is_planar:  # interleaved: one row of samples * channels values
            array = array.reshape(-1, channels).T
        yield _to_float(array).mean(axis=0, dtype=np.float32)


def _to_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM scaled to [-1, 1) as soundfile does; float samples kept as they are."""
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(-np.iinfo(array.dtype).min)
    return array.astype(np.float32, copy=False)


def _check_stream(
    rate: int, channels: int, header_frames: float | None, max_seconds: float, *, slack: int
) -> int:
    """Check the header before any sample is decoded; return how many frames at `rate` may be.

    The rate, the channel count and, where the header records it, the length are checked; the
    frames allowed are max_seconds' worth plus `slack`.
    """
    if rate <= 0:
        raise MediaError("audio is corrupt: its header gives no sample rate")
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise MediaError(f"audio sample rate {rate} Hz is outside {MIN_SOURCE_RATE}..{MAX_SOURCE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise MediaError(f"audio has {channels} channels, limit is {MAX_CHANNELS}")
    limit = math.floor(max_seconds * rate) + slack
    if header_frames is not None and header_frames > limit:
        raise MediaError(f"audio is {header_frames / rate:.2f} s long, limit is {max_seconds:g} s")
    return limit


def _collect(blocks: Iterable[np.ndarray], limit: int, max_seconds: float) -> np.ndarray:
    """Join mono blocks, refusing as soon as they pass `limit` frames (so decoding stops there)."""
    parts: list[np.ndarray] = []
    total = 0
    for block in blocks:
        parts.append(block)
        total += len(block)
        if total > limit:
            raise MediaError(f"audio is longer than the limit of {max_seconds:g} s")
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
