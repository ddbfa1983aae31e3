"""Video parts at the gateway, over a fake backend: the plan (grid, `<|video_pad|>` count, seconds per
temporal patch) and the cache key are computed without decoding the frames or importing torch, the
bytes travel unchanged, images and videos keep their prompt order, and bad videos are 400s."""

from __future__ import annotations

import json

import pytest
from gateway_helpers import chat_body, data_uri, image_part, png

from common.video_plan import settings_of, video_key
from common.video_sampling import VIDEO_PREPROCESSOR_CONFIG, VideoSampling
from tests.video_helpers import make_video

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"
VIDEO = make_video(8, 56, 56, 8)  # 1 s: 2 frames at 2 fps, raised to min_frames 4


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def mp4_uri(data: bytes) -> str:
    return data_uri(data, "video/mp4")


async def test_a_video_is_planned_and_expanded_without_decoding(client, fake, tokenizer, model_dir) -> None:
    content = [video_part(mp4_uri(VIDEO)), {"type": "text", "text": "What happens?"}]
    response = await client.post(CHAT, json=chat_body(content, max_tokens=3))
    assert response.status == 200, await response.text()
    request = fake.requests[-1]
    (video,) = request.images
    # the tiny checkpoint's video config: 56 x 56 stays 56 x 56; 4 frames make 2 temporal patches
    assert video.kind == "video" and video.grid_thw == (2, 4, 4) and video.num_tokens == 8
    assert video.second_per_grid_t == 0.5  # 2 frames per patch, sampled at 4 / 8 x 8 = 4 fps
    assert video.data == VIDEO and (video.width, video.height) == (56, 56)
    config = json.loads((model_dir / VIDEO_PREPROCESSOR_CONFIG).read_text())
    assert video.video is not None and video.video.max_frames == config["max_frames"]
    assert video.hash == video_key(VIDEO, video.video)
    pad = tokenizer.token_id("<|video_pad|>")
    rendered = tokenizer.render_chat_ids([{"role": "user", "content": [{"type": "video"}, content[1]]}])
    assert rendered.count(pad) == 1
    assert request.token_ids.count(pad) == 8 and len(request.token_ids) == len(rendered) - 1 + 8
    assert (await response.json())["usage"]["prompt_tokens"] == len(request.token_ids)


async def test_images_and_videos_keep_their_prompt_order(client, fake, tokenizer) -> None:
    other = make_video(16, 112, 56, 4, seed=1)
    content = [
        image_part(data_uri(png(56, 56))),
        video_part(mp4_uri(VIDEO)),
        {"type": "text", "text": "and"},
        video_part(mp4_uri(other)),
    ]
    response = await client.post(CHAT, json=chat_body(content, max_tokens=2))
    assert response.status == 200, await response.text()
    items = fake.requests[-1].images
    assert [i.kind for i in items] == ["image", "video", "video"]
    assert items[2].grid_thw == (4, 4, 8) and items[2].second_per_grid_t == 1.0
    ids = fake.requests[-1].token_ids
    image, video = tokenizer.token_id("<|image_pad|>"), tokenizer.token_id("<|video_pad|>")
    first = [i for i, t in enumerate(ids) if t in (image, video)]
    assert ids[first[0]] == image and ids.count(image) == items[0].num_tokens
    assert ids.count(video) == items[1].num_tokens + items[2].num_tokens


async def test_another_sampling_is_another_cache_key() -> None:
    settings = VideoSampling()
    faster = VideoSampling(fps=4.0)
    assert video_key(VIDEO, settings_of(settings)) != video_key(VIDEO, settings_of(faster))
    assert video_key(VIDEO, settings_of(settings)) == video_key(bytes(VIDEO), settings_of(VideoSampling()))


async def test_a_local_video_under_an_allowed_folder(make_client, fake, tmp_path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "clip.mp4").write_bytes(VIDEO)
    (tmp_path / "secret.mp4").write_bytes(VIDEO)
    client = await make_client(allowed_local_media_dirs=[allowed])
    for url in (str(allowed / "clip.mp4"), (allowed / "clip.mp4").as_uri()):
        response = await client.post(CHAT, json=chat_body([video_part(url)], max_tokens=1))
        assert response.status == 200, await response.text()
        assert fake.requests[-1].images[0].data == VIDEO
    response = await client.post(CHAT, json=chat_body([video_part(str(tmp_path / "secret.mp4"))]))
    assert response.status == 400
    assert "outside the allowed folders" in (await response.json())["error"]["message"]


PARAM = "messages[0].content[0].video_url.url"


def _silent_mp4() -> bytes:
    """An MP4 whose only stream is audio: no video to take."""
    import io

    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode())
    return buffer.getvalue()


BAD_VIDEOS = [
    ("corrupt bytes", [video_part(mp4_uri(b"\x00" * 64 + VIDEO[64:]))], {}, "cannot decode the video"),
    ("not a video", [video_part(mp4_uri(b"hello, not a film" * 20))], {}, "cannot decode the video"),
    ("empty", [video_part("data:video/mp4;base64,")], {}, "the video is empty"),
    ("audio only", [video_part(mp4_uri(_silent_mp4()))], {}, "no video stream, only audio"),
    ("too long", [video_part(mp4_uri(VIDEO))], {"max_video_seconds": 0.5}, "longer than the limit of 0.5 s"),
    ("too many frames", [video_part(mp4_uri(VIDEO))], {"max_video_frames": 4}, "more than 4 frames"),
    ("too large frames", [video_part(mp4_uri(VIDEO))], {"max_video_frame_pixels": 1000}, "limit is 1000 pixels"),
    ("over the byte limit", [video_part(mp4_uri(VIDEO))], {"max_video_bytes": 1000}, "limit of 1000 bytes"),
    ("local path, none allowed", [video_part("/etc/hostname")], {}, "local video files are not allowed"),
    ("over http", [video_part("https://example.com/a.mp4")], {}, "not fetched by this server"),
    ("relative path", [video_part("clip.mp4")], {}, "unsupported video URL"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "overrides", "fragment"), [c[1:] for c in BAD_VIDEOS], ids=[c[0] for c in BAD_VIDEOS]
)
async def test_a_bad_video_is_a_400_that_says_what_is_wrong(
    make_client, fake, content, overrides, fragment
) -> None:
    client = await make_client(**overrides)
    response = await client.post(CHAT, json=chat_body(content))
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert fragment in error["message"] and error["param"] == PARAM, error
    assert fake.requests == [], "a refused request must never reach the backend"


async def test_video_counts_and_placeholders_are_checked(make_client, fake, tokenizer) -> None:
    client = await make_client(max_videos_per_request=1)
    two = [video_part(mp4_uri(VIDEO)), video_part(mp4_uri(VIDEO))]
    response = await client.post(CHAT, json=chat_body(two))
    assert response.status == 400
    assert "too many videos: the request has 2, the limit is 1" in (await response.json())["error"]["message"]
    typed = [video_part(mp4_uri(VIDEO)), {"type": "text", "text": "<|video_pad|>"}]
    response = await client.post(CHAT, json=chat_body(typed))
    assert response.status == 200, "a video placeholder past the video's own is text, as in vLLM"
    pad, ids = tokenizer.token_id("<|video_pad|>"), fake.requests[-1].token_ids
    n = fake.requests[-1].images[0].num_tokens
    assert ids.count(pad) == n + 1 and ids[ids.index(pad) : ids.index(pad) + n] == [pad] * n
    response = await client.post(CHAT, json=chat_body([{"type": "video_url", "video_url": {}}]))
    assert (
        response.status == 400
        and (await response.json())["error"]["param"] == "messages[0].content[0].video_url"
    )
    assert len(fake.requests) == 1, "only the request with a typed placeholder was served"
