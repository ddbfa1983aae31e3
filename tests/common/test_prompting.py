"""Placeholder expansion and prompt rendering: the gateway's torch-free path must give the same prompt
ids the engine and the references build with transformers' tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.prompting import chat_prompt_ids, expand_placeholders, user_message
from common.tokenizer import TextTokenizer

PAD = 9


def test_expand_placeholders_in_order() -> None:
    assert expand_placeholders([1, PAD, 2, PAD, 3], PAD, [3, 1]) == [1, PAD, PAD, PAD, 2, PAD, 3]
    assert expand_placeholders([1, 2], PAD, []) == [1, 2]


def test_placeholders_of_a_kind_with_no_items_are_plain_tokens() -> None:
    assert expand_placeholders([1, PAD, 2], PAD, []) == [1, PAD, 2]


def test_placeholders_past_the_items_are_plain_tokens() -> None:
    assert expand_placeholders([PAD, 1, PAD], PAD, [4]) == [PAD, PAD, PAD, PAD, 1, PAD]


def test_expand_placeholders_rejects_fewer_placeholders_than_items() -> None:
    with pytest.raises(ValueError, match="2 image placeholders but 3 images"):
        expand_placeholders([PAD, 1, PAD], PAD, [4, 4, 4])


def test_user_message_puts_images_first() -> None:
    assert user_message("hi", 2) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}
    ]


def test_chat_prompt_ids_match_the_gateway_tokenizer(tiny_qwen2_vl: Path) -> None:
    from transformers import AutoTokenizer

    ours = TextTokenizer.from_dir(tiny_qwen2_vl)
    pad = ours.token_id("<|image_pad|>")
    counts = [5, 2]
    expected = expand_placeholders(ours.render_chat_ids(user_message("Two pictures?", 2)), pad, counts)
    ids = chat_prompt_ids(AutoTokenizer.from_pretrained(tiny_qwen2_vl), "Two pictures?", pad, counts)
    assert ids == expected
    assert ids.count(pad) == sum(counts)
