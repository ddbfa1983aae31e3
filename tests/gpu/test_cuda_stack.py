"""Stacks on one GPU (every process on device 0; split prefill and decode hand the KV over device to
device by cudaipc, the default there, or through host staging over shm) answer the official openai
client exactly as transformers' greedy generate does (fp32), streamed and concurrent requests included."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import ask_concurrently, image_message
from tests.e2e.stack import running_stack

MAX_TOKENS = 16


@pytest.mark.parametrize(
    ("topology", "dataplane"),
    [("E1 PD1", "auto"), ("EPD1", "auto"), ("E1 P1 D1", "auto"), ("E1 P1 D1", "shm")],
    ids=["E1 PD1", "EPD1", "E1 P1 D1 cudaipc", "E1 P1 D1 host staging"],
)
def test_stack_on_one_gpu_serves_transformers_answers(
    topology, dataplane, tiny_qwen2_vl, tmp_path, reference, images
):
    expected = [reference.answer(img, MAX_TOKENS) for img in images]
    extra = ("--device", "cuda", "--dtype", "float32", "--max-num-seqs", "16", "--dataplane", dataplane)
    with running_stack(tiny_qwen2_vl, topology, tmp_path, *extra, timeout=300) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=image_message(images[0]), max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == expected[0]
        stream = client.chat.completions.create(
            model=model, messages=image_message(images[1]), max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected[1]

        assert ask_concurrently(stack.base_url, model, images, MAX_TOKENS) == expected
