"""Audio input: every container decodes to the right 16 kHz mono signal, every refusal says why, and
the torch-free placeholder count is the one transformers' Qwen2-Audio processor gives.

Test audio is made in memory: soundfile writes WAV, FLAC and Ogg; PyAV encodes MP3, AAC and Opus.
"""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from common.audio import decode_audio, resample, sniff_container
from common.audio_features import AudioGeometry, qwen2_audio_num_tokens, whisper_num_frames
from common.audio_sources import audio_url_bytes, input_audio_bytes, read_audio_file
from common.media import MediaError

TONES = ((440.0, 0.5), (3000.0, 0.3))  # (Hz, amplitude): both below 4 kHz, the Nyquist of 8 kHz
EDGE = 320  # output samples (20 ms) at each end, where the filter sees the silence outside the clip


def _tones(rate: int, seconds: float, tones=TONES) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return sum(a * np.sin(2 * np.pi * f * t) for f, a in tones).astype(np.float32)


def _soundfile(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _ffmpeg(samples: np.ndarray, rate: int, muxer: str, codec: str) -> bytes:
    """Encode (frames,) or (frames, channels) float samples with PyAV; skip if the wheel lacks the codec."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    planes = np.ascontiguousarray(samples.T if samples.ndim == 2 else samples[np.newaxis])
    layout = "mono" if planes.shape[0] == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def _analytic(num_samples: int, rate: int = 16_000, tones=TONES) -> np.ndarray:
    t = np.arange(num_samples) / rate
    return sum(a * np.sin(2 * np.pi * f * t) for f, a in tones)


# --- decoding and resampling ---------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_resampled_sine_matches_the_analytic_one(rate: int, subtype: str) -> None:
    """The same tones computed at 16 kHz are the reference: within 1e-4 (PCM_16 quantisation is 3e-5,
    the filter's ripple less) once 20 ms of filter edge is trimmed at each end; the length follows
    librosa's ceil(n * 16000 / rate)."""
    source = _tones(rate, 1.3)
    out = decode_audio(_soundfile(source, rate, subtype=subtype))
    assert out.dtype == np.float32
    assert len(out) == math.ceil(len(source) * 16_000 / rate)
    error = np.abs(out - _analytic(len(out)))[EDGE:-EDGE].max()
    assert error < 1e-4, f"{rate} Hz {subtype}: max error {error:.2e}"


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 192_000])
def test_resampled_length_follows_librosa_even_for_tiny_clips(rate: int) -> None:
    """libswresample holds back a filter's worth of output; the flush must give it all back."""
    for num_samples in (1, 2, 3, 100, 12_345):
        out = resample(np.full(num_samples, 0.25, np.float32), rate, 16_000)
        assert len(out) == math.ceil(num_samples * 16_000 / rate), num_samples
        assert out.dtype == np.float32 and np.abs(out).max() > 0, num_samples  # not flushed away
    assert abs(out[len(out) // 2] - 0.25) < 1e-3  # a long constant keeps its level


def test_tones_above_the_new_nyquist_are_filtered_not_aliased() -> None:
    """A 10 kHz tone at 44.1 kHz cannot exist at 16 kHz; unfiltered it would fold to 6 kHz."""
    out = decode_audio(_soundfile(_tones(44_100, 1.0, ((10_000.0, 0.5),)), 44_100, subtype="FLOAT"))
    rms_db = 20 * np.log10(np.sqrt(np.mean(out[EDGE:-EDGE] ** 2)) / (0.5 / np.sqrt(2)))
    assert rms_db < -60, f"10 kHz leaks through at {rms_db:.1f} dB"


@pytest.mark.parametrize("rate", [16000, 48000])
def test_channels_mix_to_their_mean(rate: int) -> None:
    left, right = _tones(rate, 1.0, ((440.0, 0.6),)), _tones(rate, 1.0, ((3000.0, 0.4),))
    out = decode_audio(_soundfile(np.stack([left, right], axis=1), rate, subtype="FLOAT"))
    expected = _analytic(len(out), tones=((440.0, 0.3), (3000.0, 0.2)))
    assert np.abs(out - expected)[EDGE:-EDGE].max() < 1e-4
    three = np.stack([left, right, np.full_like(left, 0.3)], axis=1)
    out = decode_audio(_soundfile(three, rate, subtype="FLOAT"))
    expected = expected * 2 / 3 + 0.1  # every channel counts, not only the first two
    assert np.abs(out - expected)[EDGE:-EDGE].max() < 1e-4


def test_opposite_channels_cancel_in_ffmpeg_formats() -> None:
    """The FFmpeg path mixes too: a tone in one channel and its negation in the other average to 0."""
    tone = _tones(44_100, 1.0, ((440.0, 0.5),))
    out = decode_audio(_ffmpeg(np.stack([tone, -tone], axis=1), 44_100, "mp3", "libmp3lame"))
    assert np.sqrt(np.mean(out**2)) < 0.01


def _lossy_cases() -> list:
    tone = _tones(48_000, 1.0, ((440.0, 0.5),))
    stereo = np.stack([tone, tone], axis=1)
    cases = [
        ("ogg", "ogg", lambda: _soundfile(tone, 48_000, "OGG", "VORBIS")),
        ("ogg", "opus", lambda: _soundfile(stereo, 48_000, "OGG", "OPUS")),
        ("mp3", "mp3", lambda: _ffmpeg(tone, 48_000, "mp3", "libmp3lame")),
        ("mp4", "m4a", lambda: _ffmpeg(stereo, 48_000, "ipod", "aac")),
        ("aac", "aac", lambda: _ffmpeg(tone, 48_000, "adts", "aac")),
        ("webm", "webm", lambda: _ffmpeg(stereo, 48_000, "webm", "libopus")),
    ]
    return [pytest.param(container, declared, make, id=declared) for container, declared, make in cases]


@pytest.mark.parametrize("container,declared,make", _lossy_cases())
def test_lossy_formats_decode_to_the_tone(container: str, declared: str, make) -> None:
    """Lossy codecs shift and reshape the wave (AAC's 1024-sample priming), so the check is the
    pitch (the spectrum's peak within 2 Hz of 440) and the level (RMS within 10%)."""
    data = make()
    assert sniff_container(data) == container
    out = decode_audio(data, declared_format=declared)
    assert abs(len(out) - 16_000) <= 1200  # one second, plus codec padding
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * 16_000 / len(out)
    assert abs(peak_hz - 440) < 2, f"peak at {peak_hz:.1f} Hz"
    rms = np.sqrt(np.mean(out[1200:-1200] ** 2))
    assert abs(rms / (0.5 / np.sqrt(2)) - 1) < 0.1, f"RMS {rms:.3f}"


def test_flac_without_a_recorded_length_still_decodes() -> None:
    """libsndfile fails on such a stream, so it goes to FFmpeg; the samples are the same."""
    data = bytearray(_soundfile(_tones(22_050, 1.0), 22_050, "FLAC"))
    data[21] &= 0xF0  # the 36-bit total-samples field of STREAMINFO
    data[22:26] = bytes(4)
    out = decode_audio(bytes(data))
    assert np.abs(out - _analytic(len(out)))[EDGE:-EDGE].max() < 1e-4


def test_samples_stay_within_plus_minus_one() -> None:
    loud = np.concatenate([np.full(8000, 1.5, np.float32), np.full(8000, -2.0, np.float32)])
    out = decode_audio(_soundfile(loud, 16_000, subtype="FLOAT"))
    assert out.max() == 1.0 and out.min() == -1.0


def test_output_rate_is_a_parameter() -> None:
    out = decode_audio(_soundfile(_tones(44_100, 1.0), 44_100), sampling_rate=24_000)
    assert len(out) == 24_000
    assert np.abs(out - _analytic(24_000, rate=24_000))[EDGE:-EDGE].max() < 1e-4


# --- limits and refusals -------------------------------------------------------------------------


def test_thirty_seconds_is_accepted_and_longer_is_refused() -> None:
    assert len(decode_audio(_soundfile(_tones(44_100, 30.0), 44_100))) == 480_000
    with pytest.raises(MediaError, match=r"audio is 31.00 s long, limit is 30 s"):
        decode_audio(_soundfile(_tones(8000, 31.0), 8000))  # refused from the header
    with pytest.raises(MediaError, match=r"audio is 3.00 s long, limit is 2.5 s"):
        decode_audio(_soundfile(_tones(8000, 3.0), 8000), max_seconds=2.5)


def test_codec_padding_past_the_limit_is_cut_not_refused() -> None:
    """A 30 s AAC clip decodes about 1024 samples longer (the priming): it passes, cut to 30 s."""
    out = decode_audio(_ffmpeg(_tones(22_050, 30.0), 22_050, "ipod", "aac"))
    assert len(out) == 480_000


def test_overlong_audio_without_a_trusted_length_stops_decoding() -> None:
    """MP3 lengths may be bitrate estimates, so the decoder counts samples and stops past the limit."""
    data = _ffmpeg(_tones(16_000, 4.0), 16_000, "mp3", "libmp3lame")
    with pytest.raises(MediaError, match="audio is longer than the limit of 2 s"):
        decode_audio(data, max_seconds=2)


def test_byte_limit_and_empty_input() -> None:
    data = _soundfile(_tones(16_000, 0.5), 16_000)
    with pytest.raises(MediaError, match=rf"audio is {len(data)} bytes, limit is 1000"):
        decode_audio(data, max_bytes=1000)
    with pytest.raises(MediaError, match=r"audio is empty \(0 bytes\)"):
        decode_audio(b"")


def test_zero_sample_audio_is_refused() -> None:
    for fmt, subtype in [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("OGG", "VORBIS")]:
        with pytest.raises(MediaError, match="audio has no samples"):
            decode_audio(_soundfile(np.zeros((0, 2), np.float32), 44_100, fmt, subtype))


def test_random_bytes_are_not_audio() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert noise[0] != 0xFF  # no accidental MPEG sync word
    with pytest.raises(MediaError, match="not a supported audio format"):
        decode_audio(noise)
    with pytest.raises(MediaError, match="not a supported audio format"):
        decode_audio(b"hello, this is text")
    corrupt_mp3 = b"ID3" + noise  # looks like an MP3, is not one
    with pytest.raises(MediaError, match="mp3 audio is corrupt or truncated"):
        decode_audio(corrupt_mp3)
    with pytest.raises(MediaError, match="corrupt: its header gives no sample rate"):
        decode_audio(b"\xff\xf1" + noise)  # an ADTS sync word, then garbage


def test_truncated_files_are_refused() -> None:
    wav = _soundfile(_tones(22_050, 1.0), 22_050)
    with pytest.raises(MediaError, match=r"wav audio is truncated: its header gives 44100 bytes"):
        decode_audio(wav[: len(wav) // 2])
    flac = _soundfile(_tones(22_050, 1.0), 22_050, "FLAC")
    with pytest.raises(MediaError, match="flac audio is corrupt or truncated"):
        decode_audio(flac[: len(flac) // 2])
    vorbis = _soundfile(_tones(22_050, 1.0), 22_050, "OGG", "VORBIS")
    # libsndfile takes an Ogg's length from its last page: a cut file is malformed, or has none left
    with pytest.raises(MediaError, match="ogg audio is corrupt or truncated|audio has no samples"):
        decode_audio(vorbis[: len(vorbis) // 2])
    m4a = _ffmpeg(_tones(22_050, 1.0), 22_050, "ipod", "aac")
    with pytest.raises(MediaError, match="mp4 audio is corrupt or truncated"):
        decode_audio(m4a[: len(m4a) // 2])
    with pytest.raises(MediaError, match="wav audio is corrupt or truncated"):
        decode_audio(wav[:30])  # the header itself is cut


def test_mismatched_or_unknown_declared_format() -> None:
    mp3 = _ffmpeg(_tones(16_000, 0.5), 16_000, "mp3", "libmp3lame")
    with pytest.raises(MediaError, match="input_audio.format is 'wav' but the data is mp3 audio"):
        decode_audio(mp3, declared_format="wav")
    with pytest.raises(MediaError, match="input_audio.format 'midi' is not supported"):
        decode_audio(mp3, declared_format="midi")
    assert len(decode_audio(mp3, declared_format="MP3")) > 0


def test_implausible_headers_are_refused() -> None:
    with pytest.raises(MediaError, match=r"sample rate 500 Hz is outside 1000..384000 Hz"):
        decode_audio(_soundfile(np.zeros(500, np.float32), 500))
    with pytest.raises(MediaError, match="audio has 9 channels, limit is 8"):
        decode_audio(_soundfile(np.zeros((1600, 9), np.float32), 16_000))
    nan = np.zeros(1600, np.float32)
    nan[100] = np.nan
    with pytest.raises(MediaError, match="NaN or infinite"):
        decode_audio(_soundfile(nan, 16_000, subtype="FLOAT"))


def test_mutated_files_fail_only_with_media_error() -> None:
    """Bytes flipped (mostly in the headers) and files cut short: each decodes to valid samples or is
    refused with a MediaError, never another exception (a codec-less MP4 stream once gave an
    AttributeError)."""
    tone, tone48 = _tones(22_050, 0.5, ((440.0, 0.5),)), _tones(48_000, 0.5, ((440.0, 0.5),))
    seeds = [
        _soundfile(tone, 22_050),
        _soundfile(tone, 22_050, "FLAC"),
        _soundfile(tone, 22_050, "OGG", "VORBIS"),
        _soundfile(tone48, 48_000, "OGG", "OPUS"),
        _ffmpeg(tone, 22_050, "mp3", "libmp3lame"),
        _ffmpeg(tone, 22_050, "ipod", "aac"),
        _ffmpeg(tone, 22_050, "adts", "aac"),
        _ffmpeg(tone48, 48_000, "webm", "libopus"),
    ]
    rng = np.random.default_rng(1)
    for seed in seeds:
        for _ in range(150):
            data = bytearray(seed)
            for _ in range(rng.integers(1, 20)):
                data[rng.integers(0, min(len(data), 200) if rng.random() < 0.7 else len(data))] = (
                    rng.integers(256)
                )
            if rng.random() < 0.3:
                data = data[: rng.integers(1, len(data))]
            try:
                out = decode_audio(bytes(data))
            except MediaError:
                continue
            assert out.dtype == np.float32 and np.isfinite(out).all() and np.abs(out).max() <= 1


# --- sources -------------------------------------------------------------------------------------


def test_input_audio_part() -> None:
    wav = _soundfile(_tones(16_000, 0.5), 16_000)
    encoded = base64.b64encode(wav).decode()
    assert input_audio_bytes({"data": encoded, "format": "wav"}) == (wav, "wav")
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert input_audio_bytes({"data": wrapped, "format": "wav"})[0] == wav
    assert input_audio_bytes({"data": f"data:audio/wav;base64,{encoded}", "format": "wav"})[0] == wav
    with pytest.raises(MediaError, match="input_audio.data is not valid base64"):
        input_audio_bytes({"data": "abc$%^", "format": "wav"})
    with pytest.raises(MediaError, match="input_audio.data must be a base64 string"):
        input_audio_bytes({"format": "wav"})
    with pytest.raises(MediaError, match="input_audio.format must be a string"):
        input_audio_bytes({"data": encoded})
    with pytest.raises(MediaError, match="input_audio.format 'pcm16' is not supported"):
        input_audio_bytes({"data": encoded, "format": "pcm16"})
    with pytest.raises(MediaError, match="too long for the limit of 100 bytes"):
        input_audio_bytes({"data": encoded, "format": "wav"}, max_bytes=100)


def test_audio_url_sources(tmp_path: Path) -> None:
    wav = _soundfile(_tones(16_000, 0.5), 16_000)
    allowed, outside = tmp_path / "audio", tmp_path / "secret"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a b.wav").write_bytes(wav)
    (outside / "c.wav").write_bytes(wav)
    (allowed / "link.wav").symlink_to(outside / "c.wav")
    uri = f"data:application/octet-stream;base64,{base64.b64encode(wav).decode()}"
    assert audio_url_bytes(uri, allowed_dirs=[]) == wav
    assert audio_url_bytes(str(allowed / "a b.wav"), allowed_dirs=[allowed]) == wav
    assert audio_url_bytes(f"file://{allowed}/a%20b.wav", allowed_dirs=[allowed]) == wav
    for url, message in [
        (str(outside / "c.wav"), "outside the allowed folders"),
        (str(allowed / "link.wav"), "outside the allowed folders"),
        (str(outside / "missing.wav"), "outside the allowed folders"),  # no probing outside
        (str(allowed / "missing.wav"), "audio file not found"),
        ("https://example.com/a.wav", "not fetched by this server"),
        ("file://host/a.wav", "must name a local file"),
        ("a.wav", "unsupported audio URL"),
    ]:
        with pytest.raises(MediaError, match=message):
            audio_url_bytes(url, allowed_dirs=[allowed])
    with pytest.raises(MediaError, match="local audio files are not allowed"):
        audio_url_bytes(str(allowed / "a b.wav"), allowed_dirs=[])
    assert read_audio_file(outside / "c.wav", allowed_dirs=None) == wav
    with pytest.raises(MediaError, match="limit is 10"):
        read_audio_file(allowed / "a b.wav", allowed_dirs=None, max_bytes=10)


# --- placeholder counts --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_audio_processor():
    """transformers' Qwen2AudioProcessor with a three-token tokenizer: enough to count placeholders."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

    specials = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    vocab = {"<unk>": 0, **{token: i + 1 for i, token in enumerate(specials)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        additional_special_tokens=specials,
    )
    return Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer
    )


@pytest.mark.parametrize("num_samples", [8000, 16_000, 116_800, 478_400, 480_000, 1, 320, 321, 480_001])
def test_placeholder_count_matches_transformers(qwen2_audio_processor, num_samples: int) -> None:
    """0.5 s, 1 s, 7.3 s, 29.9 s and 30 s, then the edges: 1-2 frames give 0 tokens, 3 give 1, and
    anything past 30 s is cut to 30 s by the extractor's truncation."""
    import torch
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    audio = np.full(num_samples, 0.01, np.float32)
    out = qwen2_audio_processor(
        text="<|audio_bos|><|AUDIO|><|audio_eos|>", audio=audio, sampling_rate=16_000, return_tensors="np"
    )
    frames = int(out["feature_attention_mask"].sum())
    _, model_tokens = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, torch.tensor(frames))
    processor_tokens = int((out["input_ids"][0] == qwen2_audio_processor.audio_token_id).sum())
    assert whisper_num_frames(num_samples) == frames
    assert qwen2_audio_num_tokens(frames) == int(model_tokens) == processor_tokens
    assert AudioGeometry().num_tokens(num_samples) == processor_tokens


def test_frame_count_when_the_window_is_not_a_multiple_of_the_hop() -> None:
    """transformers drops the mask's last entry then; n_samples = 16000 with hop 7 exercises it."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=7)
    geometry = AudioGeometry(hop_length=7, n_samples=16_000)
    for num_samples in (1, 7, 8, 15_995, 15_996, 16_000, 17_000):
        mask = extractor(
            np.zeros(num_samples, np.float32),
            sampling_rate=16_000,
            return_attention_mask=True,
            return_tensors="np",
        )["attention_mask"]
        assert geometry.num_frames(num_samples) == int(mask.sum()), num_samples


def test_decoded_length_gives_the_processor_count(qwen2_audio_processor) -> None:
    """End to end: a 7.3 s stereo clip at 44.1 kHz, decoded here, counted here and by transformers."""
    audio = decode_audio(_soundfile(np.stack([_tones(44_100, 7.3)] * 2, axis=1), 44_100))
    out = qwen2_audio_processor(text="<|AUDIO|>", audio=audio, sampling_rate=16_000, return_tensors="np")
    processor_tokens = int((out["input_ids"][0] == qwen2_audio_processor.audio_token_id).sum())
    assert AudioGeometry().num_tokens(len(audio)) == processor_tokens == 182


def test_geometry_from_a_saved_config(tmp_path: Path) -> None:
    config = {"feature_size": 128, "hop_length": 160, "n_samples": 480000, "sampling_rate": 16000}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert AudioGeometry.from_dir(tmp_path) == AudioGeometry()
    assert AudioGeometry.from_dict({"chunk_length": 10}).n_samples == 160_000
    assert AudioGeometry().max_seconds == 30.0
    with pytest.raises(ValueError, match="must be positive"):
        AudioGeometry(hop_length=0)


def test_modules_import_no_torch() -> None:
    code = (
        "import sys, json; import common.audio, common.audio_features; "
        "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
