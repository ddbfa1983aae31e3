"""The official openai client against `epd-serve up`, for every topology: answers equal transformers'
greedy generate on the same checkpoint, streaming equals non-streaming, concurrent requests stay apart."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import ask_concurrently, image_message
from tests.e2e.stack import running_stack

TOPOLOGIES = ["E1 P1 D1", "EP1 D1", "E1 PD1", "EPD1", "E2 P1 D2"]
MAX_TOKENS = 16


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_topology_serves_transformers_answers(topology, tiny_qwen2_vl, tmp_path, reference, images):
    expected = [reference.answer(img, MAX_TOKENS) for img in images]
    with running_stack(tiny_qwen2_vl, topology, tmp_path) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id

        # one request, not streamed
        reply = client.chat.completions.create(
            model=model, messages=image_message(images[0]), max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == expected[0]
        assert reply.usage.completion_tokens <= MAX_TOKENS and reply.usage.prompt_tokens > 64

        # the same, streamed, with usage at the end
        chunks = client.chat.completions.create(
            model=model, messages=image_message(images[0]), max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        parts, usage, finish = [], None, None
        for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(parts) == expected[0]
        assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens
        assert finish == reply.choices[0].finish_reason
        # the same prompt again: its KV but the last block came from the prefill's prefix cache
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16

        assert ask_concurrently(stack.base_url, model, images, MAX_TOKENS) == expected
    assert not stack.stage_pids(), "stage processes outlived `epd-serve up`"


@pytest.mark.parametrize("topology", ["E1 P1 D1"])
def test_flex_attention_serves_transformers_answers(topology, tiny_qwen2_vl, tmp_path, reference, images):
    """The paged FlexAttention backend (compiled, padded to buckets) in a prefill-only and a
    decode-only engine: the same answers as transformers, for one streamed request and eight
    concurrent ones. (One engine that prefills and decodes is covered, compiled, by
    tests/services/engine/attention/test_backend_fidelity.py; every topology is covered with the
    reference backend above.)"""
    expected = [reference.answer(img, MAX_TOKENS) for img in images]
    with running_stack(tiny_qwen2_vl, topology, tmp_path, "--attention-backend", "flex") as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model, messages=image_message(images[0]), max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected[0]

        assert ask_concurrently(stack.base_url, model, images, MAX_TOKENS) == expected
