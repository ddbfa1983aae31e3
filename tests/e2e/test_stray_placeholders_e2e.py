"""Placeholder tokens typed in a request's text, through the whole split stack and the openai client.

A `<|video_pad|>` in the text of a request that carries an image but no video, or an `<|image_pad|>`
in a text-only request, is an ordinary token: the answer equals transformers' greedy generate on the
same ids with that token typed as text (no features, text M-RoPE), as vLLM serves it. So is an
`<|image_pad|>` typed after the image's own: the image takes the first placeholder, the typed one is
text (tests/reference.py scatters transformers' features at the image's run only).
"""

from __future__ import annotations

import openai

from common.prompting import chat_prompt_ids
from tests.e2e.conftest import image_message
from tests.e2e.stack import running_stack
from tests.reference import hf_greedy

MAX_TOKENS = 16


def text_answer(reference, text: str) -> str:
    """transformers' greedy answer to a text-only question."""
    fam, tok = reference.loaded.family, reference.loaded.tokenizer
    ids = chat_prompt_ids(tok, text, fam.image_token_id, [])
    assert fam.image_token_id in ids and fam.video_token_id in ids, "the typed placeholders are tokens"
    tokens, _ = hf_greedy(reference.model_dir, fam, ids, [], MAX_TOKENS)
    return tok.decode(tokens, skip_special_tokens=True)


def test_typed_placeholders_are_served_as_text(tiny_qwen2_vl, tmp_path, reference, images):
    beside_image = "Is there a <|video_pad|> in this picture?"
    text_only = "Is <|image_pad|> the same as <|video_pad|>?"
    expected_image = reference.answer(images[1], MAX_TOKENS, text=beside_image)
    expected_text = text_answer(reference, text_only)
    one_more = "And is this <|image_pad|> in it?"
    expected_one_more = reference.answer(images[1], MAX_TOKENS, text=one_more)
    with running_stack(tiny_qwen2_vl, "E1 P1 D1", tmp_path) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id

        def ask(messages):
            reply = client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
            )
            return reply.choices[0].message.content

        assert ask(image_message(images[1], beside_image)) == expected_image
        assert ask([{"role": "user", "content": text_only}]) == expected_text
        assert ask(image_message(images[1], one_more)) == expected_one_more
