"""Chat and text completions over a fake backend: text, usage, streaming, images, stop strings."""

from __future__ import annotations

import io

import pytest
from gateway_helpers import chat_body, data_uri, image_part, png, sse_events
from PIL import Image

from common.hashing import content_hash
from common.vision_geometry import VisionGeometry

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"


async def test_chat_completion_returns_the_backends_text_and_usage(client, fake, tokenizer) -> None:
    response = await client.post(CHAT, json=chat_body(max_tokens=7))
    assert response.status == 200, await response.text()
    body = await response.json()
    request = fake.requests[-1]
    assert body["object"] == "chat.completion" and body["id"] == request.request_id
    assert body["id"].startswith("chatcmpl-") and response.headers["X-Request-Id"] == body["id"]
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": tokenizer.decode(fake.expected_ids(request, 7)),
    }
    assert choice["finish_reason"] == "length"
    prompt = len(request.token_ids)
    assert body["usage"] == {
        "prompt_tokens": prompt, "completion_tokens": 7, "total_tokens": prompt + 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip
    assert request.token_ids == tokenizer.render_chat_ids([{"role": "user", "content": "Hello!"}])
    assert request.images == []
    assert fake.aborts == [] and fake.closed == [request.request_id], "a finished request must not be aborted"


@pytest.mark.parametrize("tokens_per_event", [1, 3])
async def test_chat_stream_sends_role_then_deltas_then_finish_usage_and_done(
    client, fake, tokenizer, tokens_per_event
) -> None:
    fake.tokens_per_event = tokens_per_event
    body = chat_body(max_tokens=9, stream=True, stream_options={"include_usage": True})
    response = await client.post(CHAT, json=body)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(response)
    request = fake.requests[-1]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == request.request_id for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == tokenizer.decode(fake.expected_ids(request, 9))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_chat_stream_without_include_usage_has_no_usage(client) -> None:
    events = await sse_events(await client.post(CHAT, json=chat_body(max_tokens=3, stream=True)))
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_text_completion_whole_and_streamed(client, fake, tokenizer) -> None:
    response = await client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5})
    body = await response.json()
    request = fake.requests[-1]
    assert response.status == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert request.token_ids == tokenizer.encode("Once upon a time", add_special_tokens=True)
    assert body["choices"][0]["text"] == tokenizer.decode(fake.expected_ids(request, 5))
    assert body["usage"]["prompt_tokens"] == len(request.token_ids)

    body = {
        "prompt": [11, 12, 13],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = await sse_events(await client.post("/v1/completions", json=body))
    request = fake.requests[-1]
    assert request.token_ids == [11, 12, 13] and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == tokenizer.decode(fake.expected_ids(request, 4))
    assert events[-2]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}
    }  # fmt: skip


async def test_images_are_measured_hashed_and_expanded_in_prompt_order(
    client, fake, tokenizer, model_dir
) -> None:
    first = png(100, 60)
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (0, 90, 200)).save(buffer, format="JPEG")
    second = buffer.getvalue()
    content = [
        image_part(data_uri(first)),
        {"type": "text", "text": "Compare these two."},
        {"type": "image_url", "image_url": data_uri(second, "image/jpeg")},  # the bare-string form
    ]
    response = await client.post(CHAT, json=chat_body(content, max_tokens=2))
    assert response.status == 200, await response.text()
    request = fake.requests[-1]
    geometry = VisionGeometry.from_dir(model_dir)
    for image, data, (width, height) in zip(
        request.images, [first, second], [(100, 60), (300, 200)], strict=True
    ):
        assert image.data == data and image.hash == content_hash(data)
        assert (image.width, image.height) == (width, height)
        assert image.grid_thw == geometry.grid(width, height)
        assert image.num_tokens == geometry.num_tokens(width, height)
    pad = tokenizer.token_id("<|image_pad|>")
    rendered = tokenizer.render_chat_ids(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "Compare these two."},
                    {"type": "image"},
                ],
            }
        ]
    )
    assert rendered.count(pad) == 2
    assert request.token_ids.count(pad) == sum(i.num_tokens for i in request.images)
    assert len(request.token_ids) == len(rendered) - 2 + sum(i.num_tokens for i in request.images)
    assert (await response.json())["usage"]["prompt_tokens"] == len(request.token_ids)


async def test_local_images_inside_allowed_folders_are_read(make_client, fake, tmp_path) -> None:
    client = await make_client(allowed_local_media_dirs=[tmp_path])
    data = png(56, 56)
    (tmp_path / "a b.png").write_bytes(data)
    content = [image_part(str(tmp_path / "a b.png")), image_part((tmp_path / "a b.png").as_uri())]
    response = await client.post(CHAT, json=chat_body(content, max_tokens=1))
    assert response.status == 200, await response.text()
    assert [i.hash for i in fake.requests[-1].images] == [content_hash(data)] * 2


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_cuts_the_text_and_aborts_the_backend(client, fake, tokenizer, stream) -> None:
    body = chat_body(max_tokens=60, stop=["fox", "zzz"], stream=stream)
    response = await client.post(CHAT, json=body)
    request = fake.requests[-1]
    full = tokenizer.decode(fake.expected_ids(request, 60))
    assert "fox" in full
    if stream:
        events = await sse_events(response)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        finish = events[-2]["choices"][0]["finish_reason"]
    else:
        choice = (await response.json())["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
    assert text == full[: full.index("fox")] and finish == "stop"
    assert fake.aborts == [request.request_id], "the backend must be told to stop generating"
    assert fake.closed == [request.request_id]


async def test_eos_finishes_with_stop_and_is_counted_but_not_shown(client, fake, tokenizer) -> None:
    fake.eos_after = 3
    body = await (await client.post(CHAT, json=chat_body(max_tokens=20))).json()
    request = fake.requests[-1]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(fake.expected_ids(request, 3))
    assert body["usage"]["completion_tokens"] == 4 and fake.aborts == []


async def test_sampling_fields_reach_the_backend(client, fake) -> None:
    body = chat_body(
        max_tokens=50,
        max_completion_tokens=6,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        seed=1234,
        stop="END",
        stop_token_ids=[2],
        ignore_eos=True,
        n=1,
        frequency_penalty=0.0,  # unknown to this server: ignored
        user="someone",
        model=None,
    )
    response = await client.post(CHAT, json=body)
    assert response.status == 200, await response.text()
    params = fake.requests[-1].params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (
        6,
        0.7,
        0.9,
        20,
        1234,
    )
    assert (params.stop, params.stop_token_ids, params.ignore_eos) == (["END"], [2], True)


async def test_without_max_tokens_the_rest_of_the_context_is_the_budget(make_client, fake) -> None:
    client = await make_client()
    fake.max_model_len = 100
    await client.post(CHAT, json=chat_body(top_k=-1))
    request = fake.requests[-1]
    assert request.params.max_tokens == 100 - len(request.token_ids)
    assert request.params.top_k == 0
    # the tiny checkpoint's generation config says do_sample=false: greedy unless the request says otherwise
    assert request.params.temperature == 0.0

    client = await make_client(default_max_tokens=5)
    await client.post(CHAT, json=chat_body())
    assert fake.requests[-1].params.max_tokens == 5


async def test_a_form_encoded_curl_body_is_read_as_json(client, fake) -> None:
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; the body is still the JSON request.
    data = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post(CHAT, data=data, headers=headers)
    assert response.status == 200, await response.text()
