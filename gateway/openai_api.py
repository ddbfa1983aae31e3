"""OpenAI request bodies: typed schemas, and the checks that turn a body into prompt parts and sampling.

Bodies are decoded straight into msgspec Structs, so a wrong type anywhere is caught in one place and
reported with the field's path (`messages[0].content`); unknown fields are ignored, as most
OpenAI-compatible servers do, so clients that send extra options keep working; but the OpenAI options
this server does not implement are refused when set (`gateway.request_limits`). What a type cannot
express (roles, content parts, ranges, `n`) is checked here, each refusal naming the field at fault;
the options that change the logits and logprobs in `gateway.sampling_options`.
Before msgspec sees a body, its nesting depth is checked (the decoder recurses once per level).

The checks that need the tokenized prompt (context length, placeholder expansion) and the images
themselves live in `gateway.preprocess`; this module never blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from common.sampling_params import INT32_MAX, INT64_MAX, INT64_MIN, SAMPLING_EPS, SamplingParams
from gateway.content_parts import ChatPrompt, content_part
from gateway.errors import ApiError, bad_request
from gateway.request_limits import (
    MAX_JSON_DEPTH,
    UnsupportedOptions,
    check_int_range,
    check_json_depth,
    check_supported,
)
from gateway.sampling_options import check_min_tokens, processor_fields

ROLES = ("system", "user", "assistant")


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None


class _SamplingFields(UnsupportedOptions, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM): 0 or -1 disables it
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool | None = False  # extension (vLLM): benchmarks use it to fix the output length
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    min_tokens: int | None = None  # extension (vLLM)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool | None = False
    top_logprobs: int | None = None  # alternatives per token, with logprobs


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: Any  # a string, a list of one string, or a list of token ids
    logprobs: bool | int | None = None  # alternatives per token (false: none, as null)


def decode_body(body: bytes, schema: type[msgspec.Struct], max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode and type-check a JSON body; every failure is a 400 that says what is wrong and where.

    The depth scan runs first, so the decoder never recurses past `max_depth`; the RecursionError
    handler is only a backstop.
    """
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object")
    check_json_depth(body, max_depth)
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        raise _schema_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"malformed JSON in request body: {exc}") from None
    except RecursionError:
        raise bad_request("request body nests arrays and objects too deeply") from None


def _schema_error(text: str) -> ApiError:
    message, _, where = text.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").removeprefix(".")
    if missing := re.fullmatch(r"Object missing required field `(.+)`", message):
        param = f"{path}.{missing[1]}" if path else missing[1]
        return bad_request(f"missing required field '{param}'", param=param)
    if not path:
        if got := re.fullmatch(r"Expected `object`, got `(\w+)`", message):
            return bad_request(f"request body must be a JSON object, got {got[1]}")
        return bad_request(f"invalid request body: {message}")
    return bad_request(f"invalid value for '{path}': {message}", param=path)


def check_model(requested: str | None, served: str) -> None:
    """A missing `model` means the served one; any other name is OpenAI's 404 `model_not_found`."""
    if requested is not None and requested != served:
        raise ApiError(
            404,
            f"the model '{requested}' does not exist; this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


def chat_prompt(
    request: ChatCompletionRequest, max_images: int, max_videos: int = 0, max_audios: int = 0
) -> ChatPrompt:
    """Check roles and content parts; collect the media URLs (their counts are checked before any decode)."""
    if not request.messages:
        raise bad_request("'messages' must not be empty", param="messages")
    prompt = ChatPrompt(messages=[])
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            raise bad_request(
                f"{where}.role '{message.role}' is not supported; supported roles: {', '.join(ROLES)}",
                param=f"{where}.role",
            )
        if message.content is None and message.role != "assistant":
            raise bad_request(
                f"{where}.content is required for role '{message.role}'", param=f"{where}.content"
            )
        content = message.content
        if isinstance(content, list):
            content = [content_part(part, f"{where}.content[{j}]", prompt) for j, part in enumerate(content)]
        entry: dict[str, Any] = {"role": message.role, "content": content}
        if message.name is not None:
            entry["name"] = message.name
        prompt.messages.append(entry)
    for kind, limit in (("image", max_images), ("video", max_videos), ("audio", max_audios)):
        if (count := prompt.count(kind)) > limit:
            noun = "audio clips" if kind == "audio" else f"{kind}s"
            raise bad_request(
                f"too many {noun}: the request has {count}, the limit is {limit} per request",
                param="messages",
            )
    return prompt


def requested_max_tokens(request: _SamplingFields) -> tuple[int | None, str]:
    """The output budget the client asked for and the field it came from (for error messages)."""
    newer = getattr(request, "max_completion_tokens", None)
    if newer is not None:
        return newer, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


def check_sampling_fields(
    request: _SamplingFields, vocab_size: int | None, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The sampling fields that do not depend on the prompt, checked, as SamplingParams arguments.

    Fields the request leaves out take `defaults` (the checkpoint's generation config, as vLLM does),
    then OpenAI's. Ranges follow vLLM's `SamplingParams._verify_args`, with every integer bounded to
    what the wire and the engine hold. Cheap, so it runs before any image is decoded or text tokenized.
    """
    defaults = defaults or {}
    check_supported(request)
    if request.n is not None and request.n != 1:
        raise bad_request(f"n must be 1 (one choice per request is supported), got {request.n}", param="n")
    max_tokens, name = requested_max_tokens(request)
    if max_tokens is not None:
        check_int_range(max_tokens, name, 1, INT32_MAX)
    temperature = float(_pick(request.temperature, defaults.get("temperature"), 1.0))
    if not math.isfinite(temperature) or temperature < 0:
        raise bad_request(f"temperature must be a finite number >= 0, got {temperature}", param="temperature")
    top_p = float(_pick(request.top_p, defaults.get("top_p"), 1.0))
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = int(_pick(request.top_k, defaults.get("top_k"), 0))
    if not -1 <= top_k <= INT32_MAX:
        raise bad_request(
            f"top_k must be -1, 0 or between 1 and {INT32_MAX}, got {top_k} (-1 and 0 disable it)",
            param="top_k",
        )
    if request.seed is not None and not INT64_MIN <= request.seed <= INT64_MAX:
        raise bad_request(f"seed must fit in a signed 64-bit integer, got {request.seed}", param="seed")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", param="stop")
    return {
        # as vLLM: below SAMPLING_EPS is greedy, since dividing logits by it overflows to inf and NaN
        "temperature": temperature if temperature >= SAMPLING_EPS else 0.0,
        "top_p": top_p,
        "top_k": max(top_k, 0),
        "seed": request.seed,
        "stop": stop,
        "stop_token_ids": _stop_token_ids(request.stop_token_ids or [], vocab_size),
        "ignore_eos": bool(request.ignore_eos),
        **processor_fields(request, vocab_size, defaults, max_tokens),
    }


def sampling_params(
    request: _SamplingFields,
    *,
    prompt_len: int,
    max_model_len: int,
    default_max_tokens: int | None,
    vocab_size: int | None,
    defaults: dict[str, Any] | None = None,
) -> SamplingParams:
    """Sampling settings for a prompt of `prompt_len` tokens, refusing what cannot run (vLLM's rules).

    The prompt must leave room for one token; a `max_tokens` that does not fit the context is a 400,
    not silently clamped; without one, the request may use the rest of the context (or
    `default_max_tokens`, if smaller).
    """
    fields = check_sampling_fields(request, vocab_size, defaults)
    if prompt_len >= max_model_len:
        raise context_full(
            prompt_len, max_model_len, "messages" if hasattr(request, "messages") else "prompt"
        )
    room = max_model_len - prompt_len
    max_tokens, name = requested_max_tokens(request)
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif max_tokens > room:
        raise bad_request(
            f"{name} is too large: {max_tokens}; this model's maximum context length is {max_model_len} tokens "
            f"and the prompt has {prompt_len} tokens, so at most {room} tokens can be generated",
            param=name,
            code="context_length_exceeded",
        )
    check_min_tokens(fields["min_tokens"], max_tokens)  # against the budget the request ends up with
    return SamplingParams(max_tokens=max_tokens, **fields)


def context_full(prompt_len: int, max_model_len: int, param: str) -> ApiError:
    """The 400 for a prompt that leaves no room for a single output token."""
    return bad_request(
        f"this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} "
        f"tokens (images included), leaving no room for output; shorten the prompt or send fewer images",
        param=param,
        code="context_length_exceeded",
    )


def _stop_token_ids(ids: Sequence[int], vocab_size: int | None) -> list[int]:
    """Each id a token of the vocabulary (when its size is known) and within int32 anyway."""
    end = INT32_MAX + 1 if vocab_size is None else min(vocab_size, INT32_MAX + 1)
    for i, token in enumerate(ids):
        if not 0 <= token < end:
            raise bad_request(
                f"stop_token_ids[{i}] must be a token id in [0, {end}), got {token}", param="stop_token_ids"
            )
    return list(ids)


def _pick(*values: Any) -> Any:
    return next(v for v in values if v is not None)
