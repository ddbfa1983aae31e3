"""Request limits that hold: text length before tokenizing, nesting depth before decoding, integer
ranges before the wire, greedy below vLLM's epsilon, and OpenAI options refused rather than ignored.

Each test reproduces a finding from an attack on a live stack: a 60 MB message that took the gateway
to 14 GB, deep nesting and a 2**64 `top_k` that gave 500s, a tiny temperature that sampled NaN, and
options such as `tools` or `logprobs` that were silently dropped.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import msgspec
import pytest
from gateway_helpers import chat_body

from common.sampling_params import INT32_MAX, INT64_MAX, INT64_MIN, SamplingParams
from common.tokenizer import TextTokenizer
from gateway import request_limits
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.openai_api import ChatCompletionRequest, CompletionRequest, decode_body
from gateway.preprocess import Preprocessor

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class CountingTokenizer:
    """The real tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self, inner: TextTokenizer) -> None:
        self.inner = inner
        self.tokenized: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.tokenized.append(len(text))
        return self.inner.encode(text, add_special_tokens)

    def render_chat_ids(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        text = self.inner.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text)


def _chat(**fields: Any) -> ChatCompletionRequest:
    return decode_body(json.dumps(chat_body(**fields)).encode(), ChatCompletionRequest)


def _completion(**fields: Any) -> CompletionRequest:
    return decode_body(json.dumps(fields).encode(), CompletionRequest)


@pytest.fixture
def counting(tokenizer: TextTokenizer) -> CountingTokenizer:
    return CountingTokenizer(tokenizer)


@pytest.fixture
def preprocessor(model_dir, counting) -> Preprocessor:
    return Preprocessor(GatewayConfig(model_dir=model_dir), counting)  # type: ignore[arg-type]


# -- 1. text length, in characters before tokenizing, then in tokens --------------------------------


def test_overlong_chat_text_is_refused_without_tokenizing_or_copying_it(preprocessor, counting) -> None:
    request = _chat(content="a" * 8_000_000, max_tokens=2)  # 8 MB, far past 4096 tokens x 16
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as caught:
            preprocessor.chat(request, "chatcmpl-1", 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    error = caught.value
    assert error.status == 400 and error.param == "messages" and error.code == "context_length_exceeded"
    assert "8000000 characters" in error.message and "the limit is 65536 characters" in error.message
    assert counting.tokenized == [], "a prompt refused for its length must never be tokenized"
    assert peak < 1_000_000, f"refusing an 8 MB prompt allocated {peak} bytes"


def test_text_is_counted_across_messages_and_parts(preprocessor, counting) -> None:
    parts = [{"type": "text", "text": "b" * 300}] * 2
    body = {"messages": [{"role": "system", "content": "a" * 300}, {"role": "user", "content": parts}]}
    request = decode_body(json.dumps(body).encode(), ChatCompletionRequest)
    with pytest.raises(ApiError, match="900 characters of text, the limit is 800"):
        preprocessor.chat(request, "chatcmpl-2", 50)  # 50 tokens x 16 characters
    assert counting.tokenized == []


@pytest.mark.parametrize("prompt", ["word " * 205, ["word " * 205]])
def test_overlong_completion_prompt_is_refused_before_tokenizing(preprocessor, counting, prompt) -> None:
    with pytest.raises(ApiError, match="'prompt' is too long: 1025 characters") as caught:
        preprocessor.completion(_completion(prompt=prompt), "cmpl-1", 64)
    assert caught.value.param == "prompt" and counting.tokenized == []


def test_text_within_the_character_limit_is_then_checked_in_tokens(preprocessor, counting) -> None:
    with pytest.raises(ApiError, match="maximum context length is 64 tokens") as caught:
        preprocessor.completion(_completion(prompt="word " * 204), "cmpl-2", 64)  # 1020 characters
    assert caught.value.code == "context_length_exceeded" and counting.tokenized == [1020]


def test_token_id_prompts_are_measured_before_each_id_is_checked(preprocessor) -> None:
    with pytest.raises(ApiError, match="the prompt has 100000 tokens"):
        preprocessor.completion(_completion(prompt=[1] * 99_999 + ["x"]), "cmpl-3", 64)


def test_the_characters_per_token_are_configurable(model_dir, counting) -> None:
    config = GatewayConfig(model_dir=model_dir, max_prompt_chars_per_token=2)
    preprocessor = Preprocessor(config, counting)  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="the limit is 128 characters"):
        preprocessor.completion(_completion(prompt="x" * 129), "cmpl-4", 64)
    with pytest.raises(ValueError, match="max_prompt_chars_per_token"):
        GatewayConfig(model_dir=model_dir, max_prompt_chars_per_token=0)


@pytest.mark.asyncio
async def test_an_overlong_message_gets_a_400_over_http(client, fake) -> None:
    response = await client.post(CHAT, json=chat_body("z" * (4096 * 16 + 1)))
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == "messages", error
    assert "the limit is 65536 characters" in error["message"]
    assert fake.requests == []


# -- 2. nesting depth, before msgspec decodes ------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


DEEP_BODIES = {
    "chat content": (CHAT, f'{{"messages": [{{"role": "user", "content": [{_nested(1000)}]}}]}}'),
    "completion prompt": (COMPLETIONS, f'{{"prompt": {_nested(1000)}}}'),
    "unknown field": (CHAT, f'{{"messages": [{{"role": "user", "content": "hi"}}], "x": {_nested(10**5)}}}'),
    "unclosed objects": (COMPLETIONS, '{"prompt": "hi", "x": ' + '{"a": ' * 5000),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("endpoint, body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
async def test_deep_nesting_is_a_400_not_a_500(client, fake, endpoint, body) -> None:
    response = await client.post(endpoint, data=body.encode())
    error = (await response.json())["error"]
    assert response.status == 400, error
    assert "more than 64 levels deep" in error["message"]
    assert fake.requests == []


def test_nesting_counts_only_brackets_outside_strings() -> None:
    assert not request_limits.nesting_exceeds(_nested(64).encode(), 64)
    assert request_limits.nesting_exceeds(_nested(65).encode(), 64)
    in_text = json.dumps({"prompt": "[{" * 1000 + '\\"[ \\\\'}).encode()
    assert not request_limits.nesting_exceeds(in_text, 64)
    after_escapes = b'{"a": "\\\\", "b": ' + _nested(65).encode() + b"}"  # the string ends at \\"
    assert request_limits.nesting_exceeds(after_escapes, 64)


def test_nesting_is_tracked_across_scan_chunks(monkeypatch) -> None:
    monkeypatch.setattr(request_limits, "_SCAN_CHUNK", 7)
    body = json.dumps({"a": "]]]" * 50, "b": [[["x[", {"c": [[]]}]]] * 30}).encode()
    assert not request_limits.nesting_exceeds(body, 7)
    assert request_limits.nesting_exceeds(body, 6)


# -- 3. integer ranges ---------------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("top_k", 2**64, "top_k must be -1, 0 or between 1 and 2147483647, got 18446744073709551616", "top_k"),
    ("top_k", 2**31, "top_k must be -1, 0 or between 1 and 2147483647, got 2147483648", "top_k"),
    ("top_k", -2, "top_k must be -1, 0 or between 1", "top_k"),
    ("max_tokens", 2**31, "max_tokens must be at most 2147483647", "max_tokens"),
    ("max_completion_tokens", 2**64, "max_completion_tokens must be at most 2147483647", "max_completion_tokens"),
    ("seed", 2**64, "seed must fit in a signed 64-bit integer", "seed"),
    ("seed", -(2**63) - 1, "seed must fit in a signed 64-bit integer", "seed"),
    ("stop_token_ids", [1, 2, 3, 2**64], "stop_token_ids[3] must be a token id in [0, ", "stop_token_ids"),
    ("stop_token_ids", [-1], "stop_token_ids[0] must be a token id", "stop_token_ids"),
    ("n", 2**64, "n must be 1", "n"),
    ("n", 0, "n must be 1", "n"),
    ("top_p", 1.5, "top_p must be in (0, 1]", "top_p"),
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("field, value, fragment, param", OUT_OF_RANGE)
async def test_out_of_range_numbers_are_refused_naming_the_field(client, fake, field, value, fragment, param):
    response = await client.post(CHAT, json={**chat_body(max_tokens=2), field: value})
    error = (await response.json())["error"]
    assert response.status == 400, error
    assert fragment in error["message"] and error["param"] == param, error
    assert fake.requests == []


def test_stop_token_ids_must_be_in_the_vocabulary(preprocessor, tokenizer) -> None:
    vocab = tokenizer.vocab_size
    with pytest.raises(
        ApiError, match=rf"stop_token_ids\[1\] must be a token id in \[0, {vocab}\), got {vocab}"
    ):
        preprocessor.chat(_chat(stop_token_ids=[0, vocab]), "chatcmpl-3", 4096)


def test_the_extremes_of_every_range_are_accepted_and_survive_the_wire(preprocessor, tokenizer) -> None:
    request = _chat(
        top_k=INT32_MAX, seed=INT64_MIN, max_tokens=1, stop_token_ids=[0, tokenizer.vocab_size - 1]
    )
    params = preprocessor.chat(request, "chatcmpl-4", 4096).params
    assert (params.top_k, params.seed) == (INT32_MAX, INT64_MIN)
    for top_k, seed in ((-1, INT64_MAX), (0, 0)):
        params = preprocessor.chat(_chat(top_k=top_k, seed=seed), "chatcmpl-5", 4096).params
        assert params.top_k == 0 and params.seed == seed
        wire = msgspec.msgpack.encode(params)
        assert msgspec.msgpack.decode(wire, type=SamplingParams) == params


def test_sampling_params_refuse_what_the_wire_cannot_carry() -> None:
    for bad in ({"top_k": 2**64}, {"max_tokens": 2**31}, {"seed": 2**63}, {"stop_token_ids": [2**31]}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(temperature=float("nan"))


# -- 4. a temperature below vLLM's epsilon is greedy ---------------------------------------------------


@pytest.mark.parametrize("temperature, expected", [(1e-40, 0.0), (9.9e-6, 0.0), (1e-5, 1e-5), (0.7, 0.7)])
def test_tiny_temperatures_become_greedy(preprocessor, temperature, expected) -> None:
    params = preprocessor.chat(_chat(temperature=temperature), "chatcmpl-6", 4096).params
    assert params.temperature == expected and params.greedy == (expected == 0.0)


# -- 5. OpenAI options this server does not implement ----------------------------------------------

UNSUPPORTED = [
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f"}]),
    ("function_call", {"name": "f"}),
    ("best_of", 2),
    ("echo", True),
    ("suffix", "the end"),
    ("best_of", "1"),  # a neutral value in the wrong type is not neutral
]  # logprobs, penalties, logit_bias and min_tokens are implemented: tests/gateway/test_logprobs.py
NEUTRAL = {
    "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "functions": [],
    "function_call": "auto", "logprobs": False, "top_logprobs": 0, "frequency_penalty": 0,
    "presence_penalty": 0.0, "repetition_penalty": 1, "logit_bias": {}, "min_tokens": 0, "best_of": 1,
    "echo": False, "suffix": "", "n": 1, "user": "someone", "metadata": {"unrelated": [1, 2]},
}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("field, value", UNSUPPORTED, ids=[f"{f}={v!r}" for f, v in UNSUPPORTED])
async def test_unsupported_options_are_refused_not_ignored(client, fake, endpoint, field, value) -> None:
    body = chat_body(max_tokens=2) if endpoint == CHAT else {"prompt": "hi", "max_tokens": 2}
    response = await client.post(endpoint, json={**body, field: value})
    error = (await response.json())["error"]
    assert response.status == 400, error
    assert error["param"] == field and error["code"] == "unsupported_parameter", error
    assert f"'{field}' is not supported" in error["message"]
    assert fake.requests == []


@pytest.mark.asyncio
async def test_neutral_values_and_unrelated_fields_are_accepted(client, fake) -> None:
    for endpoint, body in ((CHAT, chat_body(max_tokens=2)), (COMPLETIONS, {"prompt": "hi", "max_tokens": 2})):
        response = await client.post(endpoint, json={**body, **NEUTRAL})
        assert response.status == 200, await response.text()
    assert len(fake.requests) == 2


def test_a_refusal_does_not_echo_a_large_value() -> None:
    with pytest.raises(ApiError) as caught:
        request_limits.check_supported(_chat(tools=[{"name": "x" * 10_000}]))
    assert len(caught.value.message) < 200 and caught.value.message.count("...") == 1
