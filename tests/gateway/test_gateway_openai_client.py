"""The official `openai` client against the gateway on a real socket: the wire format is really OpenAI's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio
from gateway_helpers import data_uri, image_part, png

from gateway.app import create_app, start_site
from gateway.config import GatewayConfig

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def api(model_dir, tokenizer, fake) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(GatewayConfig(model_dir=model_dir, host="127.0.0.1", port=0), fake, tokenizer)
    runner = await start_site(app, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
    ) as api:
        yield api
    await runner.cleanup()


async def test_chat_completion_with_an_image(api, fake, tokenizer, model_dir) -> None:
    content = [image_part(data_uri(png())), {"type": "text", "text": "What is this?"}]
    result = await api.chat.completions.create(
        model=model_dir.name, messages=[{"role": "user", "content": content}], max_tokens=6, seed=3
    )
    request = fake.requests[-1]
    assert result.choices[0].message.content == tokenizer.decode(fake.expected_ids(request, 6))
    assert result.choices[0].finish_reason == "length" and result.id == request.request_id
    assert result.usage.prompt_tokens == len(request.token_ids) and result.usage.completion_tokens == 6
    assert len(request.images) == 1 and request.params.seed == 3


async def test_streamed_chat_completion_with_usage(api, fake, tokenizer, model_dir) -> None:
    stream = await api.chat.completions.create(
        model=model_dir.name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_completion_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    request = fake.requests[-1]
    assert text == tokenizer.decode(fake.expected_ids(request, 8))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == len(
        request.token_ids
    )


async def test_completions_whole_and_streamed(api, fake, tokenizer, model_dir) -> None:
    result = await api.completions.create(model=model_dir.name, prompt="The sky is", max_tokens=4)
    assert result.choices[0].text == tokenizer.decode(fake.expected_ids(fake.requests[-1], 4))
    stream = await api.completions.create(
        model=model_dir.name, prompt="The sky is", max_tokens=4, stream=True
    )
    assert "".join([c.choices[0].text async for c in stream]) == result.choices[0].text


async def test_errors_surface_as_openai_exceptions(api, fake, model_dir) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await api.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="broken base64"):
        bad = [image_part("data:image/png;base64,@@@")]
        await api.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": bad}])
    fake.fail_after = 2
    with pytest.raises(openai.APIError, match="decode instance d0 died"):
        stream = await api.chat.completions.create(
            model=model_dir.name, messages=[{"role": "user", "content": "x"}], max_tokens=9, stream=True
        )
        async for _ in stream:
            pass
    fake.fail_after = None
    models = await api.models.list()
    assert [m.id for m in models.data] == [model_dir.name]
