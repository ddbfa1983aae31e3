"""Audio through `epd-serve up` with the official openai client: the gateway decodes and counts the
clip, the encoder decodes it again and runs the Whisper-style tower, prefill scatters its features, and
the answer equals transformers' greedy generate (Qwen2AudioProcessor's inputs) on the same checkpoint.
One request per topology, a 1 s WAV as OpenAI's `input_audio` part; a corrupt clip and an image sent
to the audio model are 400s."""

from __future__ import annotations

import base64

import openai
import pytest
import torch

from common.audio import decode_audio
from common.prompting import mm_message
from tests.audio_helpers import wav_bytes
from tests.e2e.conftest import data_uri
from tests.reference import make_image

MAX_TOKENS = 12
QUESTION = "What sound is this?"


def expected_answer(checkpoint, clip: bytes) -> str:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template(
        mm_message(QUESTION, ["audio"]), add_generation_prompt=True, tokenize=False
    )
    samples = decode_audio(clip)  # the reference gets the 16 kHz samples our decoder makes
    inputs = processor(text=prompt, audio=[samples], sampling_rate=16_000, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def audio_message(clip: bytes, fmt: str = "wav") -> list[dict]:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": fmt}}
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("topology", ["EPD1", "E1 P1 D1", "EP1 D1", "E1 PD1"])
def test_an_audio_request_gets_transformers_answer(topology, tiny_qwen2_audio, tmp_path):
    from tests.e2e.stack import running_stack

    clip = wav_bytes(1.0, rate=22_050, seed=2)  # resampled to 16 kHz on both sides: 25 tokens
    expected = expected_answer(tiny_qwen2_audio, clip)
    assert expected.strip(), "an empty reference answer would prove nothing"
    with running_stack(tiny_qwen2_audio, topology, tmp_path) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=audio_message(clip), max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens > 25  # 25 audio placeholder tokens, and the text
        chunks = client.chat.completions.create(
            model=model, messages=audio_message(clip), max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected

        with pytest.raises(openai.BadRequestError, match="corrupt or truncated|not a supported audio"):
            client.chat.completions.create(
                model=model, messages=audio_message(b"\x00" * 64 + clip[64:]), max_tokens=2
            )
        image = {"type": "image_url", "image_url": {"url": data_uri(make_image(56, 56))}}
        with pytest.raises(openai.BadRequestError, match="does not take images"):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": [image]}], max_tokens=2
            )
