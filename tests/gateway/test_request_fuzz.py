"""Fuzzing request validation: whatever the body, only an ApiError with a 4xx status escapes.

Bodies go through the path the gateway's handlers take (decode_body, check_model, then the
Preprocessor with the real tokenizer and chat template of the tiny checkpoint): random JSON-ish
values under the schemas' own field names and under random ones, wrong types, huge integers, NaN and
infinities (Python's json writes them; JSON has no such literals), deep nesting spliced into the
text, and plain random bytes. Whatever is accepted must be able to travel: its SamplingParams must
encode to msgpack, which is where an unbounded integer used to fail, after the request had started.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import msgspec
import pytest
from gateway_helpers import data_uri, png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import request_limits
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.openai_api import ChatCompletionRequest, CompletionRequest, check_model, decode_body
from gateway.preprocess import Preprocessor

SERVED = "tiny"
IMAGE = data_uri(png(56, 56))
DEEP = "__deep__"  # a string value replaced by deep nesting once the body is written as JSON
SETTINGS = settings(  # no example database: it would be a folder of files in the checkout
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _field_names(schema: type[msgspec.Struct]) -> list[str]:
    return [f.name for f in msgspec.structs.fields(schema)]


WORDS = ["text", "image_url", "url", "type", "role", "content", "name", "user", "assistant", "system",
         "tool", "include_usage", "<|image_pad|>", "data:image/png;base64,iVBOR", "/etc/hostname", SERVED,
         "auto", "none", "json_object", ""]  # fmt: skip
KEYS = st.sampled_from(WORDS + _field_names(ChatCompletionRequest) + _field_names(CompletionRequest))
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(),  # NaN and infinities included
    st.sampled_from([1e-40, 1e-5, 9.9e-6, 1e39, 1e308, -0.0, 0.5, 2.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), st.sampled_from(WORDS + [DEEP]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)


def _mostly(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The plausible value 19 times in 20, anything at all the 20th: with a wrong type in every field
    no body would get past the schema."""
    return st.integers(0, 19).flatmap(lambda i: VALUES if i == 0 else plausible)


INTS = st.one_of(st.integers(-3, 50), NUMBERS.filter(lambda n: type(n) is int))
TEXTS = st.text(max_size=60) | st.sampled_from(WORDS)
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([None, SERVED, "gpt-4o"]),
    **dict.fromkeys(["max_tokens", "max_completion_tokens", "top_k", "seed", "n"], INTS),
    **dict.fromkeys(["temperature", "top_p"], NUMBERS),
    "stop": TEXTS | st.lists(TEXTS, max_size=3),
    "stop_token_ids": st.lists(INTS, max_size=4),
    **dict.fromkeys(["ignore_eos", "stream", "logprobs", "echo"], st.booleans() | st.none()),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    **dict.fromkeys(
        ["frequency_penalty", "presence_penalty", "min_tokens", "top_logprobs"], st.just(0) | NUMBERS
    ),
    **dict.fromkeys(["repetition_penalty", "best_of"], st.just(1) | NUMBERS),
    **dict.fromkeys(["tools", "functions"], st.just([]) | st.lists(VALUES, max_size=2)),
    **dict.fromkeys(["tool_choice", "function_call"], st.sampled_from(["none", "auto", "required"]) | VALUES),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | VALUES,
    "logit_bias": st.just({}) | st.dictionaries(st.text(max_size=4), NUMBERS, max_size=2),
    "suffix": TEXTS,
}
PARTS = st.fixed_dictionaries(
    {"type": _mostly(st.sampled_from(["text", "image_url"]))},
    optional={
        "text": _mostly(TEXTS),
        "image_url": _mostly(st.fixed_dictionaries({"url": _mostly(st.sampled_from([*WORDS, IMAGE]))})),
    },
)
MESSAGES = st.fixed_dictionaries(
    {
        "role": _mostly(st.sampled_from(["system", "user", "assistant"])),
        "content": _mostly(TEXTS | st.lists(PARTS, max_size=3)),
    },
    optional={"name": _mostly(TEXTS)},
)


@st.composite
def _bodies(
    draw: st.DrawFn, required: dict[str, st.SearchStrategy[Any]], schema: type[msgspec.Struct]
) -> Any:
    """Mostly objects with the required fields and a few of the schema's others (plausible values,
    now and then anything), plus random extra keys; sometimes any JSON value at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(VALUES)
    body = {name: draw(value) for name, value in required.items()}
    optional = [name for name in _field_names(schema) if name not in required]
    for name in draw(st.lists(st.sampled_from(optional), max_size=6, unique=True)):
        body[name] = draw(_mostly(PLAUSIBLE.get(name, VALUES)))
    extra = draw(st.dictionaries(st.text(max_size=8), VALUES, max_size=2))
    return {**extra, **body}


CHAT_BODIES = _bodies(
    {"messages": _mostly(st.lists(MESSAGES, min_size=1, max_size=3))}, ChatCompletionRequest
)
PROMPTS = TEXTS | st.lists(st.sampled_from(WORDS), max_size=2) | st.lists(INTS, max_size=20)
COMPLETION_BODIES = _bodies({"prompt": _mostly(PROMPTS)}, CompletionRequest)
DEPTHS = st.sampled_from([1, 10, 63, 64, 65, 500, 5000])
CONTEXTS = st.sampled_from([1, 16, 64, 4096, 4096, 4096])


def _encode(body: Any, depth: int) -> bytes:
    text = json.dumps(body)  # allow_nan: NaN and Infinity are written, as a careless client would
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth, 1).encode()


@pytest.fixture(scope="module")
def preprocessor(model_dir, tokenizer) -> Preprocessor:
    return Preprocessor(GatewayConfig(model_dir=model_dir, served_model_name=SERVED), tokenizer)


def _serve(preprocessor: Preprocessor, body: bytes, endpoint: str, max_model_len: int) -> None:
    """What the gateway does with a body before it reaches the backend; only 4xx ApiErrors may escape."""
    try:
        if endpoint == "chat":
            chat = decode_body(body, ChatCompletionRequest)
            check_model(chat.model, SERVED)
            prepared = preprocessor.chat(chat, "chatcmpl-fuzz", max_model_len)
        else:
            completion = decode_body(body, CompletionRequest)
            check_model(completion.model, SERVED)
            prepared = preprocessor.completion(completion, "cmpl-fuzz", max_model_len)
    except ApiError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        assert exc.message, "a refusal must say why"
        return
    assert 0 < len(prepared.token_ids) < max_model_len
    msgspec.msgpack.encode(prepared.params)  # accepted means it can travel to the stages


@SETTINGS
@given(body=CHAT_BODIES, depth=DEPTHS, max_model_len=CONTEXTS)
def test_chat_bodies_are_served_or_refused_with_a_4xx(preprocessor, body, depth, max_model_len) -> None:
    _serve(preprocessor, _encode(body, depth), "chat", max_model_len)


@SETTINGS
@given(body=COMPLETION_BODIES, depth=DEPTHS, max_model_len=CONTEXTS)
def test_completion_bodies_are_served_or_refused_with_a_4xx(preprocessor, body, depth, max_model_len) -> None:
    _serve(preprocessor, _encode(body, depth), "completions", max_model_len)


@SETTINGS
@given(body=st.binary(max_size=200) | st.text(alphabet='[]{}",:\\ 0an', max_size=300).map(str.encode))
def test_random_bytes_are_served_or_refused_with_a_4xx(preprocessor, body) -> None:
    for endpoint in ("chat", "completions"):
        _serve(preprocessor, body, endpoint, 4096)


def _depth(value: Any) -> int:
    if isinstance(value, list | dict):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max(map(_depth, children), default=0)
    return 0


TRICKY_TEXT = st.text(alphabet='[]{}"\\ab', max_size=10)
NESTED = st.recursive(
    st.none() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY_TEXT, inner, max_size=3),
    max_leaves=30,
)


@SETTINGS
@given(value=NESTED, chunk=st.sampled_from([1, 3, 8, 1 << 20]), ascii_only=st.booleans())
def test_the_depth_scan_agrees_with_the_decoded_value(value, chunk, ascii_only) -> None:
    """Brackets and escapes inside strings never count, and the depth carries across scan chunks."""
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    depth = _depth(value)
    with mock.patch.object(request_limits, "_SCAN_CHUNK", chunk):
        for limit in range(max(depth - 2, 0), depth + 2):
            assert request_limits.nesting_exceeds(body, limit) == (depth > limit), (body, limit)
