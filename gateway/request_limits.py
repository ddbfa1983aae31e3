"""Limits that keep what a request costs in proportion to what it may ask for, each checked before the
work it bounds, and the OpenAI options this server refuses rather than silently ignores.

- Nesting: msgspec's decoder recurses once per level of arrays and objects, so 1,000 levels end in a
  RecursionError. The raw bytes are scanned for bracket depth first, without recursion and in fixed
  chunks, and a body deeper than `MAX_JSON_DEPTH` is a 400. A chat request needs about six levels.
- Prompt text: tokenizing allocates hundreds of bytes per character (a 60 MB message grew the gateway
  to 14 GB), so the characters are counted first. A prompt may hold `max_prompt_chars_per_token`
  (GatewayConfig) characters per token of the context; only then is it tokenized and counted in tokens.
- Numbers: every integer must fit where it goes (msgpack carries 64 bits, the engine's tensors int32);
  the ranges themselves live in `common.sampling_params`, the checks in `gateway.openai_api`.
- Unsupported options (`UnsupportedOptions`): a client that asks for tools, structured output or
  several choices and gets plain text without them cannot tell; a non-neutral value is a 400 naming
  the parameter. (Logprobs, penalties, `logit_bias` and `min_tokens` are implemented:
  `gateway.sampling_options`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import msgspec
import numpy as np

from gateway.errors import ApiError, bad_request

MAX_JSON_DEPTH = 64  # levels of arrays and objects in a request body
_SCAN_CHUNK = 1 << 20  # bytes per step of the depth scan: its memory stays fixed whatever the body
_QUOTE = ord('"')
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


# -- nesting ------------------------------------------------------------------------------------------


def check_json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a body whose arrays and objects nest deeper than `limit`, before any decoder recurses."""
    if nesting_exceeds(body, limit):
        raise bad_request(
            f"request body nests arrays and objects more than {limit} levels deep; "
            "no field of this API needs that many"
        )


def nesting_exceeds(body: bytes, limit: int) -> bool:
    """Whether brackets outside JSON strings nest deeper than `limit` anywhere in `body`.

    A body with at most `limit` opening brackets cannot (the common case, one count). Otherwise the
    escapes that matter are dropped (`\\\\` first, then `\\"`, as a JSON reader pairs them from the
    left), so every remaining quote opens or closes a string; then, chunk by chunk, quote parity
    masks the brackets inside strings and a running sum of +1/-1 per bracket gives the depth. Up to
    the first syntax error this is the depth a decoder reaches, which is all that matters here.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth, quotes = 0, 0
    for start in range(0, len(body), _SCAN_CHUNK):
        chunk = np.frombuffer(body, dtype=np.uint8, count=min(_SCAN_CHUNK, len(body) - start), offset=start)
        is_quote = chunk == _QUOTE
        chunk_quotes = int(np.count_nonzero(is_quote))
        if chunk_quotes == 0 and quotes & 1:
            continue  # the whole chunk is inside one string (a long text)
        steps = np.take(_BRACKET_STEP, chunk)
        if chunk_quotes:
            in_string = (np.cumsum(is_quote, dtype=np.int32) + quotes) & 1
            steps = np.where(in_string == 0, steps, 0)
        levels = np.cumsum(steps, dtype=np.int32)  # a chunk's sum is bounded by its length
        if depth + int(levels.max()) > limit:
            return True
        depth, quotes = depth + int(levels[-1]), quotes + chunk_quotes
    return False


# -- prompt text --------------------------------------------------------------------------------------


def chat_text_chars(messages: Iterable[dict[str, Any]]) -> int:
    """Characters of text in checked chat messages (string contents, text parts, names): what the
    chat template will hand the tokenizer, less the template's own few markers."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part["text"]) for part in content if part.get("type") == "text")
        total += len(message.get("name") or "")
    return total


def check_prompt_chars(chars: int, *, max_model_len: int, chars_per_token: int, param: str) -> None:
    """Refuse prompt text longer than `chars_per_token` characters per token of the context, before
    tokenizing it: a prompt that long cannot fit (or is made of pathological runs of symbols)."""
    limit = max_model_len * chars_per_token
    if chars > limit:
        raise bad_request(
            f"the prompt in '{param}' is too long: {chars} characters of text, the limit is {limit} "
            f"characters ({chars_per_token} per token of this model's {max_model_len}-token context); "
            "shorten the prompt",
            param=param,
            code="context_length_exceeded",
        )


# -- integer ranges -----------------------------------------------------------------------------------


def check_int_range(value: int, name: str, low: int, high: int, param: str | None = None) -> None:
    """Refuse an integer outside [low, high]; the message names the field, the bound and the value."""
    if value < low:
        raise bad_request(f"{name} must be at least {low}, got {value}", param=param or name)
    if value > high:
        raise bad_request(f"{name} must be at most {high}, got {value}", param=param or name)


# -- unsupported OpenAI options -----------------------------------------------------------------------


class UnsupportedOptions(msgspec.Struct, kw_only=True):
    """OpenAI options this server does not implement, decoded only so that a non-neutral value is
    refused (`check_supported`) instead of ignored. Typed `Any`: any value but the neutral ones is
    refused the same way, whatever its type. (`n` is checked with the sampling fields.)"""

    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None


def _number(neutral: float) -> Callable[[Any], bool]:
    return lambda v: type(v) in (int, float) and v == neutral


def _empty(kind: type) -> Callable[[Any], bool]:
    return lambda v: type(v) is kind and not v


# What each option may be set to and still mean "not used" (clients such as the openai SDK send some
# of these explicitly), with the hint the refusal gives. None (absent or null) is always neutral.
NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (lambda v: v == {"type": "text"}, 'leave it out or send {"type": "text"}'),
    "tools": (_empty(list), "leave it out or send []"),
    "tool_choice": (lambda v: v in ("none", "auto"), 'leave it out or send "none"'),
    "functions": (_empty(list), "leave it out or send []"),
    "function_call": (lambda v: v in ("none", "auto"), 'leave it out or send "none"'),
    "best_of": (_number(1), "leave it out or send 1"),
    "echo": (lambda v: v is False, "leave it out or send false"),
    "suffix": (_empty(str), 'leave it out or send ""'),
}


def check_supported(request: UnsupportedOptions) -> None:
    """Refuse the first unsupported option set to anything but a neutral value."""
    for name, (neutral, hint) in NEUTRAL.items():
        value = getattr(request, name)
        if value is not None and not neutral(value):
            raise unsupported(name, value, hint)


def unsupported(name: str, value: Any, hint: str) -> ApiError:
    return ApiError(
        400,
        f"'{name}' is not supported by this server, got {_preview(value)}; {hint}",
        param=name,
        code="unsupported_parameter",
    )


def _preview(value: Any, limit: int = 60) -> str:
    """The value as JSON, cut short; containers are cut first, so that a refusal neither echoes nor
    copies a megabyte of tools."""
    text = msgspec.json.encode(_cut(value, limit)).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut(value: Any, limit: int, levels: int = 3) -> Any:
    """At most 3 items per container, 3 levels and `limit` characters per string; "..." marks a cut."""
    if isinstance(value, str):
        return value[:limit]
    if not isinstance(value, list | dict):
        return value
    if levels == 0:
        return "..."
    if isinstance(value, dict):
        cut: Any = {k[:limit]: _cut(v, limit, levels - 1) for k, v in islice(value.items(), 3)}
        return {**cut, "...": "..."} if len(value) > 3 else cut
    cut = [_cut(v, limit, levels - 1) for v in value[:3]]
    return [*cut, "..."] if len(value) > 3 else cut
