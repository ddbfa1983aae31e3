"""A Qwen3-VL video (next to an image) through `epd-serve up` on E1 P1 D1 with the official openai
client: the gateway plans the frames with Qwen3-VL's rule and writes a timestamp before each temporal
patch's run of pads, the encoder decodes and encodes with the settings it was sent (main and DeepStack
features in one tensor), prefill accepts one run per temporal patch, and the answer equals
transformers' greedy generate on the prompt `Qwen3VLProcessor`'s text rule gives."""

from __future__ import annotations

import base64

import openai

from services.models.loader import load_model
from tests.e2e.conftest import data_uri
from tests.e2e.stack import running_stack
from tests.qwen3_vl_helpers import processor_prompt_ids
from tests.reference import hf_greedy, make_image
from tests.video_helpers import make_video, video_item

MAX_TOKENS = 12
QUESTION = "What happens in the video, and what is in the picture?"


def test_a_qwen3_vl_video_request_gets_transformers_answer(tiny_qwen3_vl, tmp_path):
    video, image = make_video(10, 64, 48, 5, seed=1), make_image(84, 56, seed=5)
    loaded = load_model(tiny_qwen3_vl)
    fam = loaded.family
    ids = processor_prompt_ids(tiny_qwen3_vl, QUESTION, [("video", video), ("image", image)])
    items = [video_item(fam, video)[0], fam.preprocess(image)]
    tokens, _ = hf_greedy(tiny_qwen3_vl, fam, ids, items, MAX_TOKENS, ["video", "image"])
    expected = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    assert expected.strip(), "an empty reference answer would prove nothing"
    uri = "data:video/mp4;base64," + base64.b64encode(video).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": uri}},
                {"type": "image_url", "image_url": {"url": data_uri(image)}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    with running_stack(tiny_qwen3_vl, "E1 P1 D1", tmp_path) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == len(ids)
