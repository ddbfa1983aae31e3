"""Audio parts at the gateway, over a fake backend: `input_audio` and `audio_url` clips are decoded,
counted (`<|AUDIO|>` tokens from the 16 kHz length, without torch) and expanded in prompt order, the
bytes travel unchanged with the cut they were counted within, and bad clips or parts of a kind the
model does not take are 400s naming the part."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from fake_backend import SENTENCE, FakeBackend
from gateway_helpers import chat_body, data_uri, image_part, png

from common.audio import decode_audio
from common.audio_features import AudioGeometry
from common.tokenizer import TextTokenizer
from gateway.app import create_app
from gateway.audios import audio_key
from gateway.config import GatewayConfig
from tests.audio_helpers import wav_bytes

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"
WAV = wav_bytes(1.0)  # 16 kHz mono: 100 feature frames, 25 tokens


def input_audio(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def audio_url(url: str) -> dict:
    return {"type": "audio_url", "audio_url": {"url": url}}


@pytest.fixture(scope="module")
def audio_tokenizer(tiny_qwen2_audio: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(tiny_qwen2_audio)


@pytest.fixture
def audio_fake(audio_tokenizer: TextTokenizer) -> FakeBackend:
    return FakeBackend(text_ids=audio_tokenizer.encode(SENTENCE), eos_id=audio_tokenizer.eos_token_ids[0])


@pytest_asyncio.fixture
async def audio_client(tiny_qwen2_audio, audio_tokenizer, audio_fake):
    clients: list[TestClient] = []

    async def make(**overrides) -> TestClient:
        config = GatewayConfig(model_dir=tiny_qwen2_audio, **overrides)
        client = TestClient(TestServer(create_app(config, audio_fake, audio_tokenizer)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def refused(client: TestClient, content: list, param: str, words: str) -> None:
    response = await client.post(CHAT, json=chat_body(content, max_tokens=2))
    body = await response.json()
    assert response.status == 400, body
    assert body["error"]["param"] == param, body
    assert words in body["error"]["message"], body


async def test_input_audio_is_counted_and_expanded(audio_client, audio_fake, audio_tokenizer) -> None:
    client = await audio_client()
    content = [input_audio(WAV), {"type": "text", "text": "What is it?"}]
    response = await client.post(CHAT, json=chat_body(content, max_tokens=3))
    assert response.status == 200, await response.text()
    request = audio_fake.requests[-1]
    (clip,) = request.images
    assert clip.kind == "audio" and clip.num_tokens == 25 and clip.grid_thw == (1, 1, 25)
    assert clip.data == WAV and clip.max_seconds == 30.0
    assert clip.hash == audio_key(WAV, 16_000, 30.0)
    pad = audio_tokenizer.token_id("<|AUDIO|>")
    rendered = audio_tokenizer.render_chat_ids([{"role": "user", "content": [{"type": "audio"}, content[1]]}])
    assert rendered.count(pad) == 1
    assert request.token_ids.count(pad) == 25 and len(request.token_ids) == len(rendered) - 1 + 25
    assert (await response.json())["usage"]["prompt_tokens"] == len(request.token_ids)


async def test_audio_url_clips_keep_their_prompt_order(audio_client, audio_fake, audio_tokenizer) -> None:
    client = await audio_client()
    flac = wav_bytes(2.3, rate=44_100, channels=2, seed=1, fmt="FLAC")
    content = [audio_url(data_uri(flac, "audio/flac")), {"type": "text", "text": "and"}, input_audio(WAV)]
    response = await client.post(CHAT, json=chat_body(content, max_tokens=2))
    assert response.status == 200, await response.text()
    first, second = audio_fake.requests[-1].images
    expected = AudioGeometry().num_tokens(len(decode_audio(flac)))
    assert first.num_tokens == expected == 57 and second.num_tokens == 25
    assert first.hash != second.hash
    ids = audio_fake.requests[-1].token_ids
    pad = audio_tokenizer.token_id("<|AUDIO|>")
    runs = [i for i, t in enumerate(ids) if t == pad]
    assert len(runs) == 82 and runs[56] + 1 != runs[57]  # two runs: 57 then 25
    text = audio_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.index("Audio 1:") < text.index("and") < text.index("Audio 2:")


async def test_a_local_clip_under_an_allowed_folder(audio_client, audio_fake, tmp_path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "clip.wav").write_bytes(WAV)
    client = await audio_client(allowed_local_media_dirs=[allowed])
    response = await client.post(CHAT, json=chat_body([audio_url(str(allowed / "clip.wav"))], max_tokens=2))
    assert response.status == 200, await response.text()
    assert audio_fake.requests[-1].images[0].data == WAV


async def test_parts_the_model_does_not_take(audio_client, client) -> None:
    audio = await audio_client()
    await refused(
        audio, [image_part(data_uri(png(56, 56)))], "messages[0].content[0].image_url.url",
        "this model does not take images (it takes audio)",
    )  # fmt: skip
    await refused(
        audio, [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
        "messages[0].content[0].video_url.url", "does not take videos",
    )  # fmt: skip
    await refused(
        client, [{"type": "text", "text": "hi"}, input_audio(WAV)], "messages[0].content[1].input_audio",
        "this model does not take audio (it takes images and videos)",
    )  # fmt: skip
    await refused(
        client, [audio_url(data_uri(WAV, "audio/wav"))], "messages[0].content[0].audio_url.url",
        "does not take audio",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("part", "words"),
    [
        (input_audio(b"not audio at all" * 8), "not a supported audio format"),
        (input_audio(b""), "audio is empty"),
        (input_audio(WAV[: len(WAV) // 2]), "truncated"),
        (input_audio(WAV, "mp3"), "input_audio.format is 'mp3' but the data is wav audio"),
        (input_audio(WAV, "midi"), "input_audio.format 'midi' is not supported"),
        (input_audio(wav_bytes(0.01)), "audio is too short"),
        (
            {"type": "input_audio", "input_audio": {"format": "wav"}},
            "input_audio.data must be a base64 string",
        ),
        ({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, "not valid base64"),
        (audio_url("https://example.com/a.wav"), "are not fetched by this server"),
        (audio_url("/etc/passwd"), "local audio files are not allowed"),
    ],
)
async def test_bad_clips_are_400s(audio_client, part, words) -> None:
    client = await audio_client()
    param = "messages[0].content[0]." + ("input_audio" if part["type"] == "input_audio" else "audio_url.url")
    await refused(client, [part], param, words)


async def test_limits(audio_client) -> None:
    client = await audio_client(max_audio_seconds=1.5, max_audios_per_request=2, max_audio_bytes=100_000)
    await refused(
        client, [input_audio(wav_bytes(2.0))], "messages[0].content[0].input_audio", "limit is 1.5 s"
    )
    await refused(client, [input_audio(WAV)] * 3, "messages", "too many audio clips: the request has 3")
    await refused(
        client, [input_audio(wav_bytes(3.2, rate=48_000))], "messages[0].content[0].input_audio", "limit"
    )
    await refused(
        client, [{"type": "input_audio", "input_audio": "x"}], "messages[0].content[0].input_audio", "object"
    )


async def test_an_audio_placeholder_typed_in_the_text_is_text(
    audio_client, audio_fake, audio_tokenizer
) -> None:
    """As vLLM does, the first `<|AUDIO|>` of the prompt takes the clip (here the typed one, which
    comes first); the template's own, after it, stays an ordinary token."""
    client = await audio_client()
    response = await client.post(
        CHAT, json=chat_body([{"type": "text", "text": "<|AUDIO|>"}, input_audio(WAV)], max_tokens=2)
    )
    assert response.status == 200, await response.text()
    request = audio_fake.requests[-1]
    pad, n = audio_tokenizer.token_id("<|AUDIO|>"), request.images[0].num_tokens
    first = request.token_ids.index(pad)
    assert request.token_ids[first : first + n] == [pad] * n and request.token_ids.count(pad) == n + 1


async def test_config_bounds_the_audio_limits(tiny_qwen2_audio) -> None:
    for bad in ({"max_audio_seconds": 0}, {"max_audio_seconds": 601}, {"max_audios_per_request": 0}):
        with pytest.raises(ValueError):
            GatewayConfig(model_dir=tiny_qwen2_audio, **bad)
