"""The synthetic workload: the same for the same seed, and the shape that was asked for."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from bench.serve.dataset import DatasetConfig, build_dataset


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_same_seed_same_requests_other_seed_or_stream_other_requests():
    config = DatasetConfig(prompt_len=20, prompt_len_range=0.5, output_len=16, output_len_range=0.5,
                           images=2, image_sizes=((56, 56), (84, 56)), repeat_image_fraction=0.3)  # fmt: skip
    a, b = build_dataset(config, 12, seed=3), build_dataset(config, 12, seed=3)
    assert [r.payload("m") for r in a] == [r.payload("m") for r in b]
    other_seed = build_dataset(config, 12, seed=4)
    other_stream = build_dataset(config, 12, seed=3, stream=1)
    assert [r.prompt for r in a] != [r.prompt for r in other_seed]
    assert set(a[0].images).isdisjoint(r.images[0] for r in other_stream)


def test_lengths_sizes_and_payload():
    config = DatasetConfig(prompt_len=40, prompt_len_range=0.25, output_len=32, output_len_range=0.5,
                           images=1, image_sizes=((56, 56), (112, 84)))  # fmt: skip
    requests = build_dataset(config, 60, seed=0)
    assert all(30 <= r.prompt_words <= 50 and len(r.prompt.split()) == r.prompt_words for r in requests)
    assert all(16 <= r.output_len <= 48 for r in requests)
    assert len({r.output_len for r in requests}) > 5  # spread, not a constant
    assert {decode(r.images[0]).size for r in requests} == {(56, 56), (112, 84)}
    body = requests[0].payload("qwen")
    assert body["max_tokens"] == requests[0].output_len and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "qwen" and "model" not in requests[0].payload(None)
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    fixed = build_dataset(DatasetConfig(prompt_len=7, output_len=5), 5, seed=1)
    assert {(r.prompt_words, r.output_len) for r in fixed} == {(7, 5)}


@pytest.mark.parametrize(("n", "text_only", "repeat"), [(40, 0.25, 0.5), (10, 0.0, 0.0), (20, 1.0, 0.5)])
def test_text_only_and_repeated_image_fractions(n, text_only, repeat):
    config = DatasetConfig(prompt_len=5, output_len=4, images=2, image_sizes=((56, 56),),
                           text_only_fraction=text_only, repeat_image_fraction=repeat)  # fmt: skip
    requests = build_dataset(config, n, seed=7)
    with_images = [r for r in requests if r.images]
    assert len(requests) - len(with_images) == round(text_only * n)
    assert all(len(r.images) == 2 for r in with_images)
    slots = 2 * len(with_images)
    repeated = sum(r.repeated for r in requests)
    assert repeated == min(round(repeat * slots), max(0, slots - 2))
    # a repeat is byte-identical to an image of an earlier request; fresh images are all distinct
    seen: dict[str, int] = {}
    fresh = 0
    for r in requests:
        for uri, image_id in zip(r.images, r.image_ids, strict=True):
            if uri in seen:
                assert seen[uri] == image_id
            else:
                fresh += 1
                seen[uri] = image_id
    assert fresh == slots - repeated == len(seen)
    for i, r in enumerate(with_images[1:], start=1):
        earlier = {u for q in with_images[:i] for u in q.images}
        assert sum(u in earlier for u in r.images) >= r.repeated


def test_bad_shapes_are_refused():
    for bad in [
        dict(prompt_len=0),
        dict(text_only_fraction=1.5),
        dict(prompt_len_range=1.0),
        dict(image_sizes=()),
    ]:
        with pytest.raises(ValueError):
            DatasetConfig(**bad)


def test_a_system_prompt_is_shared_by_every_request_of_every_stream():
    config = DatasetConfig(
        prompt_len=10, output_len=4, images=1, image_sizes=((56, 56),), system_prompt_len=30
    )
    first, later = build_dataset(config, 4, seed=2), build_dataset(config, 4, seed=2, stream=3)
    systems = {r.payload(None)["messages"][0]["content"] for r in first + later}
    assert len(systems) == 1 and len(systems.pop().split()) == 30
    assert all(r.payload(None)["messages"][0]["role"] == "system" for r in first)
    assert [m["role"] for m in build_dataset(DatasetConfig(), 1, seed=2)[0].payload(None)["messages"]] == [
        "user"
    ]
    with pytest.raises(ValueError, match="system prompt"):
        DatasetConfig(system_prompt_len=-1)


# --- videos and audio clips -------------------------------------------------------------------------


def media_parser():
    import argparse

    from bench.serve.options import add_arguments

    parser = argparse.ArgumentParser(prog="epd-serve bench")
    add_arguments(parser)
    return parser


def test_videos_and_audios_are_parts_the_gateway_decodes_and_the_same_for_the_same_seed():
    import av
    import soundfile as sf

    from common.audio import decode_audio
    from common.audio_sources import input_audio_bytes
    from common.media import decode_data_uri
    from common.video import VideoProbe, probe_video

    config = DatasetConfig(prompt_len=5, output_len=4, images=1, image_sizes=((56, 56),), videos=2,
                           video_size=(64, 48), video_seconds=1.5, audios=1, audio_seconds=0.5,
                           text_only_fraction=0.25)  # fmt: skip
    requests = build_dataset(config, 4, seed=5)
    again = build_dataset(config, 4, seed=5)
    assert [r.payload(None) for r in requests] == [r.payload(None) for r in again]
    media = [r for r in requests if r.images]
    assert len(media) == 3 and all(not r.videos and not r.audios for r in requests if not r.images)
    content = media[0].payload(None)["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "video_url", "video_url", "input_audio", "text"]
    videos = [v for r in media for v in r.videos]
    audios = [a for r in media for a in r.audios]
    assert len(set(videos)) == 6 and len(set(audios)) == 3  # a fresh clip per slot
    other = build_dataset(config, 4, seed=6)
    assert set(videos).isdisjoint(v for r in other for v in r.videos)
    for uri in videos[:2]:
        assert uri.startswith("data:video/mp4;base64,")
        data = decode_data_uri(uri)
        assert probe_video(data) == VideoProbe(6, 4.0, 64, 48)  # 1.5 s at 4 fps; what the gateway runs
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 6 and frames[0].shape == (48, 64, 3)
        assert len(data) < 20_000  # gradients, not noise: small
    part = content[3]["input_audio"]
    data, declared = input_audio_bytes(part)
    samples, rate = sf.read(io.BytesIO(data))
    assert declared == "wav" and rate == 16_000 and samples.shape == (8000,)
    assert decode_audio(data, declared_format=declared).shape == (8000,)


def test_media_without_images_follows_the_text_only_fraction_and_leaves_image_runs_alone():
    config = DatasetConfig(prompt_len=5, output_len=4, images=0, audios=1, audio_seconds=0.2,
                           text_only_fraction=0.5)  # fmt: skip
    requests = build_dataset(config, 6, seed=1)
    assert sum(bool(r.audios) for r in requests) == 3 and not any(r.images or r.videos for r in requests)
    plain = DatasetConfig(prompt_len=5, output_len=4, image_sizes=((56, 56),))
    moved = DatasetConfig(prompt_len=5, output_len=4, image_sizes=((56, 56),), video_seconds=9.0)
    assert [r.payload(None) for r in build_dataset(plain, 3, 2)] == [
        r.payload(None) for r in build_dataset(moved, 3, 2)
    ]


def test_the_longest_clips_pass_the_gateway_limits():
    from bench.serve.media import mp4_clip, wav_clip
    from common.audio import decode_audio
    from common.video import probe_video

    assert probe_video(mp4_clip(32, 32, 60.0, seed=1)).total_frames == 240
    # the bytes depend on the seed alone, not on the cache
    assert mp4_clip.__wrapped__(64, 48, 1.0, 3) == mp4_clip.__wrapped__(64, 48, 1.0, 3)
    assert wav_clip.__wrapped__(0.5, 3) == wav_clip.__wrapped__(0.5, 3) != wav_clip.__wrapped__(0.5, 4)
    assert decode_audio(wav_clip(30.0, seed=1), declared_format="wav").shape == (480_000,)


def test_media_flags_parse_and_bad_ones_are_refused(capsys):
    from bench.serve.runner import _workload_line, dataset_config

    args = media_parser().parse_args(["--videos", "2", "--video-seconds", "3", "--video-size", "112x64",
                                      "--audios", "1", "--audio-seconds", "30"])  # fmt: skip
    config = dataset_config(args)
    assert (config.videos, config.video_size, config.video_seconds) == (2, (112, 64), 3.0)
    assert (config.audios, config.audio_seconds) == (1, 30.0)
    line = _workload_line(args, "m")
    assert "2 video(s) of 3 s at 112x64, 4 fps" in line and "1 audio clip(s) of 30 s" in line
    defaults = media_parser().parse_args([])
    assert (defaults.videos, defaults.audios) == (0, 0) and "video" not in _workload_line(defaults, "m")
    for flags, message in [
        (["--video-seconds", "61"], "bad video length"),
        (["--video-seconds", "0"], "bad video length"),
        (["--video-seconds", "nan"], "bad video length"),
        (["--audio-seconds", "30.5"], "bad audio length"),
        (["--audio-seconds", "0"], "bad audio length"),
        (["--video-size", "225x224"], "even"),
        (["--video-size", "8x8"], "at least 16"),
        (["--video-size", "4000x4000"], "pixels"),
        (["--video-size", "224x224,112x112"], "one WIDTHxHEIGHT"),
        (["--videos", "-1"], "bad count"),
        (["--audios", "x"], "bad count"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            media_parser().parse_args(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, flags
    for bad in [dict(videos=-1), dict(videos=1, video_seconds=90.0), dict(audios=1, audio_seconds=40.0),
                dict(videos=1, video_size=(63, 48))]:  # fmt: skip
        with pytest.raises(ValueError):
            DatasetConfig(**bad)
