"""Bad input gets a 4xx that names the problem, backend failures get an error the client can see, and
the gateway keeps serving afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from gateway_helpers import chat_body, data_uri, image_part, png, sse_events

from gateway.backend import BackendError

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"
GOOD = chat_body(max_tokens=2)
IMG = image_part(data_uri(png()))


def _chat(content: Any, **fields: Any) -> dict[str, Any]:
    return chat_body(content, **fields)


# (name, endpoint, body: bytes or JSON, config overrides, status, message fragment, param)
BAD_INPUTS: list[tuple[str, str, Any, dict[str, Any], int, str, str | None]] = [
    ("malformed JSON", CHAT, b'{"messages": [', {}, 400, "malformed JSON", None),
    ("empty body", CHAT, b"", {}, 400, "request body is empty", None),
    ("body not an object", CHAT, b"[1, 2]", {}, 400, "must be a JSON object, got array", None),
    ("missing messages", CHAT, {"model": None}, {}, 400, "missing required field 'messages'", "messages"),
    ("messages not a list", CHAT, {"messages": "hi"}, {}, 400, "'messages'", "messages"),
    ("empty messages", CHAT, {"messages": []}, {}, 400, "'messages' must not be empty", "messages"),
    ("message not an object", CHAT, {"messages": ["hi"]}, {}, 400, "'messages[0]'", "messages[0]"),
    ("missing role", CHAT, {"messages": [{"content": "x"}]}, {}, 400, "'messages[0].role'", "messages[0].role"),
    ("unsupported role", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, {}, 400, "'tool' is not supported", "messages[0].role"),
    ("content a number", CHAT, {"messages": [{"role": "user", "content": 5}]}, {}, 400, "'messages[0].content'", "messages[0].content"),
    ("user content null", CHAT, {"messages": [{"role": "user", "content": None}]}, {}, 400, "content is required", "messages[0].content"),
    ("unknown part type", CHAT, _chat([{"type": "input_file"}]), {}, 400, "'input_file' is not supported", "messages[0].content[0].type"),
    ("part type not a string", CHAT, _chat([{"type": []}]), {}, 400, "type must be a string", "messages[0].content[0].type"),
    ("text part without text", CHAT, _chat([{"type": "text"}]), {}, 400, "text must be a string", "messages[0].content[0].text"),
    ("image part without url", CHAT, _chat([{"type": "image_url", "image_url": {}}]), {}, 400, "non-empty string 'url'", "messages[0].content[0].image_url"),
    ("temperature a string", CHAT, _chat("x", temperature="hot"), {}, 400, "'temperature'", "temperature"),
    ("negative temperature", CHAT, _chat("x", temperature=-1), {}, 400, "temperature must be", "temperature"),
    ("top_p zero", CHAT, _chat("x", top_p=0), {}, 400, "top_p must be in (0, 1]", "top_p"),
    ("top_k below -1", CHAT, _chat("x", top_k=-5), {}, 400, "top_k must be", "top_k"),
    ("stream a string", CHAT, _chat("x", stream="yes"), {}, 400, "'stream'", "stream"),
    ("empty stop string", CHAT, _chat("x", stop=[""]), {}, 400, "stop strings must not be empty", "stop"),
    ("stop token out of range", CHAT, _chat("x", stop_token_ids=[10**6]), {}, 400, "stop_token_ids", "stop_token_ids"),
    ("seed too large", CHAT, _chat("x", seed=2**63), {}, 400, "seed must fit", "seed"),
    ("n of 2", CHAT, _chat("x", n=2), {}, 400, "n must be 1", "n"),
    ("max_tokens zero", CHAT, _chat("x", max_tokens=0), {}, 400, "max_tokens must be at least 1", "max_tokens"),
    ("max_completion_tokens negative", CHAT, _chat("x", max_completion_tokens=-3), {}, 400, "max_completion_tokens must be at least 1", "max_completion_tokens"),
    ("max_tokens past the context", CHAT, _chat("x", max_tokens=5000), {}, 400, "max_tokens is too large: 5000", "max_tokens"),
    ("unknown model", CHAT, _chat("x", model="gpt-9"), {}, 404, "the model 'gpt-9' does not exist", "model"),
    ("broken base64", CHAT, _chat([image_part("data:image/png;base64,iVBOR#w0KGgo")]), {}, 400, "broken base64", "messages[0].content[0].image_url.url"),
    ("bytes that are not an image", CHAT, _chat([image_part(data_uri(b"hello, not a picture"))]), {}, 400, "not an image", "messages[0].content[0].image_url.url"),
    ("truncated image", CHAT, _chat([image_part(data_uri(png()[:60]))]), {}, 400, "image", "messages[0].content[0].image_url.url"),
    ("image over the byte limit", CHAT, _chat([IMG]), {"max_image_bytes": 100}, 400, "limit of 100 bytes", "messages[0].content[0].image_url.url"),
    ("image over the pixel limit", CHAT, _chat([IMG]), {"max_image_pixels": 1000}, 400, "limit is 1000 pixels", "messages[0].content[0].image_url.url"),
    ("aspect ratio too extreme", CHAT, _chat([image_part(data_uri(png(2000, 4)))]), {}, 400, "aspect ratio", "messages[0].content[0].image_url.url"),
    ("too many images", CHAT, _chat([IMG, IMG, IMG]), {"max_images_per_request": 2}, 400, "too many images: the request has 3, the limit is 2", "messages"),
    ("local path, none allowed", CHAT, _chat([image_part("/etc/hostname")]), {}, 400, "local image files are not allowed", "messages[0].content[0].image_url.url"),
    ("file URI, none allowed", CHAT, _chat([image_part("file:///etc/hostname")]), {}, 400, "local image files are not allowed", "messages[0].content[0].image_url.url"),
    ("remote URL", CHAT, _chat([image_part("https://example.com/cat.png")]), {}, 400, "not fetched", "messages[0].content[0].image_url.url"),
    ("relative path", CHAT, _chat([image_part("cat.png")]), {}, 400, "unsupported image URL", "messages[0].content[0].image_url.url"),
    ("body over the size limit", CHAT, _chat("x" * 5000), {"max_image_bytes": 1000, "max_request_bytes": 4000}, 413, "larger than the limit of 4000 bytes", None),
    ("completion without prompt", "/v1/completions", {"max_tokens": 2}, {}, 400, "missing required field 'prompt'", "prompt"),
    ("completion empty prompt", "/v1/completions", {"prompt": ""}, {}, 400, "'prompt' must not be empty", "prompt"),
    ("completion prompt an object", "/v1/completions", {"prompt": {"a": 1}}, {}, 400, "'prompt' must be a string", "prompt"),
    ("completion batched prompts", "/v1/completions", {"prompt": ["a", "b"]}, {}, 400, "batched prompts are not supported", "prompt"),
    ("completion token out of range", "/v1/completions", {"prompt": [1, 99999]}, {}, 400, "token ids must be in", "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(
    "endpoint, body, overrides, status, fragment, param",
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
async def test_bad_input_is_refused_with_a_clear_message(
    make_client, fake, endpoint, body, overrides, status, fragment, param
) -> None:
    client = await make_client(**overrides)
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    response = await client.post(endpoint, **kwargs)
    assert response.status == status, await response.text()
    error = (await response.json())["error"]
    assert fragment in error["message"], error
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert fake.requests == [], "a refused request must never reach the backend"
    good = await client.post(CHAT, json=GOOD)
    assert good.status == 200, "the gateway must keep serving after a bad request"


async def test_placeholders_typed_in_the_text_are_text(make_client, fake, tokenizer) -> None:
    """A literal `<|video_pad|>` in a request with an image but no video, `<|image_pad|>` in one with
    no image, or one more `<|image_pad|>` after the image's own, goes to the backend as the ordinary
    token it is (vLLM serves them so); only the image's own placeholder is expanded."""
    client = await make_client()
    image_pad, video_pad = tokenizer.token_id("<|image_pad|>"), tokenizer.token_id("<|video_pad|>")
    text = {"type": "text", "text": "a <|video_pad|> and a <|image_pad|>?"}
    response = await client.post(CHAT, json=_chat("a <|video_pad|> and a <|image_pad|>?"))
    assert response.status == 200, await response.text()
    ids = fake.requests[-1].token_ids
    assert ids.count(image_pad) == 1 and ids.count(video_pad) == 1 and not fake.requests[-1].images
    response = await client.post(CHAT, json=_chat([IMG, {"type": "text", "text": "a <|video_pad|>?"}]))
    assert response.status == 200, await response.text()
    request = fake.requests[-1]
    assert request.token_ids.count(video_pad) == 1
    assert request.token_ids.count(image_pad) == request.images[0].num_tokens > 1
    response = await client.post(CHAT, json=_chat([IMG, text]))
    assert response.status == 200, await response.text()
    request = fake.requests[-1]
    n = request.images[0].num_tokens
    first = request.token_ids.index(image_pad)
    assert request.token_ids[first : first + n] == [image_pad] * n  # the image's own run, first
    assert request.token_ids.count(image_pad) == n + 1 and request.token_ids[first + n] != image_pad


async def test_local_paths_outside_the_allowed_folders_are_refused(make_client, tmp_path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png())
    (allowed / "link.png").symlink_to(outside)
    client = await make_client(allowed_local_media_dirs=[allowed])
    for url in (
        str(outside),
        str(allowed / ".." / "secret.png"),
        str(allowed / "link.png"),
        str(tmp_path / "nope.png"),
    ):
        response = await client.post(CHAT, json=chat_body([image_part(url)]))
        message = (await response.json())["error"]["message"]
        assert response.status == 400 and "outside the allowed folders" in message, (url, message)
    response = await client.post(CHAT, json=chat_body([image_part(str(allowed / "missing.png"))]))
    assert response.status == 400 and "not found" in (await response.json())["error"]["message"]


async def test_a_prompt_that_fills_the_context_is_refused(make_client, fake) -> None:
    client = await make_client()
    fake.max_model_len = 40
    response = await client.post(CHAT, json=chat_body([IMG, {"type": "text", "text": "what?"}]))
    error = (await response.json())["error"]
    assert response.status == 400 and error["code"] == "context_length_exceeded"
    assert "maximum context length is 40 tokens" in error["message"] and "images included" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_refusal_before_the_first_token_keeps_its_status(client, fake, stream) -> None:
    fake.fail_before = BackendError(503, "no live decode instance")
    response = await client.post(CHAT, json=chat_body(max_tokens=4, stream=stream))
    assert response.status == 503 and response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["message"] == "no live decode instance" and error["type"] == "server_error"
    assert fake.aborts == [fake.requests[-1].request_id]


async def test_backend_failure_mid_stream_sends_an_sse_error_event(client, fake) -> None:
    fake.fail_after = 3
    response = await client.post(CHAT, json=chat_body(max_tokens=10, stream=True))
    assert response.status == 200
    events = await sse_events(response)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (
        error["message"] == "decode instance d0 died"
        and error["code"] == 502
        and error["type"] == "server_error"
    )
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2]), (
        "a failed stream must not look finished"
    )
    assert fake.aborts == [fake.requests[-1].request_id]


async def test_backend_failure_mid_request_without_stream_is_an_error_status(client, fake) -> None:
    fake.fail_after = 3
    response = await client.post(CHAT, json=chat_body(max_tokens=10))
    assert response.status == 502
    assert (await response.json())["error"]["message"] == "decode instance d0 died"


@pytest.mark.parametrize("stream", [False, True])
async def test_request_deadline_ends_the_request_with_504_and_aborts(make_client, fake, stream) -> None:
    client = await make_client(request_timeout_s=0.3)
    fake.token_delay_s = 0.05
    response = await client.post(CHAT, json=chat_body(max_tokens=200, stream=stream))
    if stream:
        error = (await sse_events(response))[-2]["error"]
    else:
        assert response.status == 504
        error = (await response.json())["error"]
    assert error["code"] == 504 and "did not finish within 0.3 s" in error["message"]
    assert fake.aborts == [fake.requests[-1].request_id]


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_request(client, fake, stream) -> None:
    fake.token_delay_s = 0.02
    body = chat_body(max_tokens=500, stream=stream)
    if stream:
        response = await client.post(CHAT, json=body)
        assert response.status == 200
        await response.content.readline()  # the first chunk arrived: generation is under way
        response.close()
    else:
        pending = asyncio.ensure_future(client.post(CHAT, json=body))
        await asyncio.sleep(0.1)
        pending.cancel()  # the client gives up waiting and drops the connection
    for _ in range(100):
        if fake.aborts:
            break
        await asyncio.sleep(0.02)
    assert fake.aborts == [fake.requests[-1].request_id], "a client that went away must free its request"
    assert fake.closed == fake.aborts
