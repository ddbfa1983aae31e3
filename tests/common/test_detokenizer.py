"""Incremental detokenization: the stream adds up to the full text, stop strings cut it."""

from __future__ import annotations

import pytest

from common.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2_vl):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2_vl)


def stream(tokenizer, text, stop=None):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for tok in ids:
        stopped = detok.push([tok])
        pieces.append(detok.new_text())
        if stopped:
            break
    pieces.append(detok.new_text(final=True))
    return detok, "".join(pieces)


def test_streamed_pieces_add_up_to_the_full_decode(tokenizer):
    text = "A red fox jumps over 12 lazy dogs. Ünïcödé ✓ too."
    detok, streamed = stream(tokenizer, text)
    assert streamed == detok.text == tokenizer.decode(tokenizer.encode(text))


def test_stop_string_cuts_the_text_and_never_leaks_into_the_stream(tokenizer):
    detok, streamed = stream(tokenizer, "The answer is blue. STOP here and more", stop=["STOP", "zzz"])
    assert detok.stopped
    assert streamed == detok.text == "The answer is blue. "


def test_no_stop_string_means_no_stop(tokenizer):
    detok, streamed = stream(tokenizer, "nothing to see", stop=["xyz"])
    assert not detok.stopped and streamed == "nothing to see"


def test_an_output_ending_inside_a_character_ends_with_its_replacement_character(tokenizer):
    ids = tokenizer.encode("colour ✓ and ✗")
    whole = [tokenizer.decode(ids[:end], skip_special_tokens=True) for end in range(1, len(ids) + 1)]
    assert any(text.endswith("\ufffd") for text in whole)  # some prefix stops inside a character
    for end, expected in enumerate(whole, start=1):
        detok = IncrementalDetokenizer(tokenizer)
        pieces = []
        for tok in ids[:end]:
            detok.push([tok])
            pieces.append(detok.new_text())
        pieces.append(detok.new_text(final=True))
        assert "".join(pieces) == expected
