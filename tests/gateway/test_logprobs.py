"""Logprobs, penalties, logit_bias and min_tokens at the gateway: checked, passed on to the stages, and
logprobs rendered so that the official `openai` client parses them, whole and streamed, chat and
completions; what stays unsupported is still refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest
import pytest_asyncio
from fake_backend import SENTENCE, FakeBackend
from gateway_helpers import chat_body

from common.logprobs import Logprobs
from gateway.app import create_app, start_site
from gateway.backend import GenerateRequest, TokenEvent
from gateway.config import GatewayConfig

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chosen_logprob(position: int) -> float:
    return -0.125 * (position % 7) - 0.01


def fake_logprobs(token_ids: list[int], start: int, n: int) -> Logprobs:
    """Token k of the output: logprob chosen_logprob(k); alternatives k, k+1, ... with -1, -2, ..."""
    positions = range(start, start + len(token_ids))
    return Logprobs(
        [chosen_logprob(k) for k in positions],
        [[t + j for j in range(n)] for t in token_ids],
        [[-1.0 - j for j in range(n)] for _ in token_ids],
    )


@dataclass
class LogprobBackend(FakeBackend):
    """The fake backend, with logprobs on its events when the request asks for them."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        inner, sent, n = super().generate(request), 0, request.params.logprobs
        try:
            async for event in inner:
                if n is not None:
                    event.logprobs = fake_logprobs(event.token_ids, sent, n)
                sent += len(event.token_ids)
                yield event
        finally:
            await inner.aclose()


@pytest.fixture
def fake(tokenizer) -> LogprobBackend:
    return LogprobBackend(text_ids=tokenizer.encode(SENTENCE), eos_id=tokenizer.eos_token_ids[0])


@pytest_asyncio.fixture
async def api(model_dir, tokenizer, fake) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(GatewayConfig(model_dir=model_dir, host="127.0.0.1", port=0), fake, tokenizer)
    runner = await start_site(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as api:
        yield api
    await runner.cleanup()


def text_of(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def check_chat_entries(entries, tokenizer, ids: list[int], n: int) -> None:
    assert [e.token for e in entries] == [text_of(tokenizer, t) for t in ids]
    assert [e.logprob for e in entries] == [chosen_logprob(k) for k in range(len(ids))]
    for e, t in zip(entries, ids, strict=True):
        assert e.bytes == list(e.token.encode())
        assert [a.token for a in e.top_logprobs] == [text_of(tokenizer, t + j) for j in range(n)]
        assert [a.logprob for a in e.top_logprobs] == [-1.0 - j for j in range(n)]


@pytest.mark.asyncio
@pytest.mark.parametrize("top", [0, 3])
async def test_chat_logprobs_parse_whole_and_streamed(api, fake, tokenizer, model_dir, top) -> None:
    messages = [{"role": "user", "content": "Hi!"}]
    kwargs = dict(model=model_dir.name, messages=messages, max_tokens=6, logprobs=True, top_logprobs=top)
    whole = await api.chat.completions.create(**kwargs)
    ids = fake.expected_ids(fake.requests[-1], 6)
    assert fake.requests[-1].params.logprobs == top
    check_chat_entries(whole.choices[0].logprobs.content, tokenizer, ids, top)

    stream = await api.chat.completions.create(**kwargs, stream=True)
    chunks = [c async for c in stream]
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert streamed == whole.choices[0].logprobs.content


@pytest.mark.asyncio
async def test_completion_logprobs_parse_whole_and_streamed(api, fake, tokenizer, model_dir) -> None:
    kwargs = dict(model=model_dir.name, prompt="The sky is", max_tokens=5, logprobs=2)
    whole = await api.completions.create(**kwargs)
    ids = fake.expected_ids(fake.requests[-1], 5)
    lp = whole.choices[0].logprobs
    texts = [text_of(tokenizer, t) for t in ids]
    assert lp.tokens == texts
    assert lp.token_logprobs == [chosen_logprob(k) for k in range(5)]
    for k, (t, top) in enumerate(zip(ids, lp.top_logprobs, strict=True)):
        # the top 2 and the chosen token (here the first of them), as OpenAI's legacy format says
        expected = {text_of(tokenizer, t): -1.0, text_of(tokenizer, t + 1): -2.0}
        expected[texts[k]] = chosen_logprob(k)
        assert top == expected
    assert lp.text_offset == [sum(len(x) for x in texts[:k]) for k in range(5)]

    stream = await api.completions.create(**kwargs, stream=True)
    parts = [c.choices[0].logprobs async for c in stream if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens
    assert sum((p.text_offset for p in parts), []) == lp.text_offset
    assert sum((p.top_logprobs for p in parts), []) == lp.top_logprobs


@pytest.mark.asyncio
async def test_no_logprobs_unless_asked(api, fake, model_dir) -> None:
    chat = await api.chat.completions.create(
        model=model_dir.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=False
    )
    assert chat.choices[0].logprobs is None and fake.requests[-1].params.logprobs is None
    completion = await api.completions.create(model=model_dir.name, prompt="x", max_tokens=3, logprobs=0)
    assert completion.choices[0].logprobs.top_logprobs[0] == {completion.choices[0].logprobs.tokens[0]: -0.01}


@pytest.mark.asyncio
async def test_a_stop_string_cuts_the_logprobs_with_the_tokens(client, fake, tokenizer) -> None:
    body = chat_body(max_tokens=12, logprobs=True, stop=["fox"])
    result = await (await client.post(CHAT, json=body)).json()
    content = result["choices"][0]["logprobs"]["content"]
    ids = fake.expected_ids(fake.requests[-1], 12)
    upto = next(k for k in range(1, 13) if "fox" in tokenizer.decode(ids[:k]))  # tokens up to the stop
    assert result["choices"][0]["message"]["content"] == tokenizer.decode(ids[:upto]).split("fox")[0]
    assert len(content) == upto == result["usage"]["completion_tokens"]
    assert "fox" in content[-1]["token"]


@pytest.mark.asyncio
async def test_min_tokens_holds_stop_strings_back(client, fake) -> None:
    early = await (await client.post(CHAT, json=chat_body(max_tokens=12, stop=["quick"]))).json()
    assert early["usage"]["completion_tokens"] <= 6, "the stop string should come early in this text"
    result = await (
        await client.post(CHAT, json=chat_body(max_tokens=12, min_tokens=6, stop=["quick"]))
    ).json()
    assert result["usage"]["completion_tokens"] == 12, "a stop string inside min_tokens must not end it"
    assert "quick" in result["choices"][0]["message"]["content"]
    assert fake.requests[-1].params.min_tokens == 6


@pytest.mark.asyncio
async def test_the_options_reach_the_stages(client, fake) -> None:
    body = chat_body(
        max_tokens=4, presence_penalty=-1.5, frequency_penalty=2, repetition_penalty=1.2,
        min_tokens=2, logit_bias={"17": -100, "3": 42.5},
    )  # fmt: skip
    response = await client.post(CHAT, json=body)
    assert response.status == 200, await response.text()
    params = fake.requests[-1].params
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (-1.5, 2.0, 1.2)
    assert params.min_tokens == 2 and params.logit_bias == {17: -100.0, 3: 42.5}


BAD = [
    (CHAT, {"presence_penalty": 3}, "presence_penalty"),
    (COMPLETIONS, {"frequency_penalty": -2.5}, "frequency_penalty"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    (COMPLETIONS, {"logprobs": 6}, "logprobs"),
    (COMPLETIONS, {"logprobs": True}, "logprobs"),
    (CHAT, {"logit_bias": {"99999999": 1}}, "logit_bias"),  # not in the vocabulary
    (CHAT, {"logit_bias": {"12": 101}}, "logit_bias"),
    (CHAT, {"logit_bias": {"twelve": 1}}, "logit_bias"),
    (CHAT, {"logit_bias": {" 12": 1}}, "logit_bias"),
    (CHAT, {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    (CHAT, {"min_tokens": -1}, "min_tokens"),
    (CHAT, {"presence_penalty": "0"}, "presence_penalty"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("endpoint, fields, param", BAD, ids=[f"{f}" for _, f, _ in BAD])
async def test_out_of_range_values_are_refused_naming_the_field(
    client, fake, endpoint, fields, param
) -> None:
    body = {**(chat_body() if endpoint == CHAT else {"prompt": "hi"}), "max_tokens": 8, **fields}
    response = await client.post(endpoint, json=body)
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == param, error
    assert param in error["message"] and fake.requests == []


@pytest.mark.asyncio
async def test_min_tokens_is_checked_against_the_budget_the_request_gets(client, fake) -> None:
    body = {"prompt": "hi", "min_tokens": 5000}  # no max_tokens: the rest of the context, 4096 at most
    error = (await (await client.post(COMPLETIONS, json=body)).json())["error"]
    assert error["param"] == "min_tokens" and "max_tokens" in error["message"]


STILL_UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("response_format", {"type": "json_object"}),
    ("best_of", 2),
    ("echo", True),
    ("suffix", "the end"),
    ("functions", [{"name": "f"}]),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("field, value", STILL_UNSUPPORTED, ids=[f for f, _ in STILL_UNSUPPORTED])
async def test_what_stays_unsupported_is_still_refused(client, fake, field, value) -> None:
    response = await client.post(CHAT, json={**chat_body(max_tokens=2), field: value})
    error = (await response.json())["error"]
    assert response.status == 400 and error["code"] == "unsupported_parameter" and error["param"] == field
    response = await client.post(CHAT, json={**chat_body(max_tokens=2), "n": 2})
    assert response.status == 400 and (await response.json())["error"]["param"] == "n"


def test_token_messages_carry_logprobs_and_still_read_without_them() -> None:
    """The fields are appended with defaults: a peer that sends none is read as before."""
    import msgspec

    from common.protocol import FirstToken, TokenUpdate

    lp = fake_logprobs([5, 6], 0, 2)
    update = TokenUpdate(request_id="r", token_ids=[5, 6], logprobs=lp)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(update), type=TokenUpdate) == update
    old = msgspec.msgpack.encode(["r", [5], True, "stop"])  # a TokenUpdate as it was before the field
    assert msgspec.msgpack.decode(old, type=TokenUpdate).logprobs is None
    first = FirstToken(request_id="r", token_id=5, num_prompt_tokens=3, logprobs=lp.head(1))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(first), type=FirstToken).logprobs == lp.head(1)
    assert "logprobs" not in msgspec.json.decode(
        msgspec.json.encode(FirstToken(request_id="r", token_id=5, num_prompt_tokens=3))
    )
