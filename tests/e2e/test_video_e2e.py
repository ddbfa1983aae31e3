"""A video through `epd-serve up` with the official openai client: the gateway probes and plans it, the
encoder decodes and encodes it, prefill places its features with video M-RoPE, and the answer equals
transformers' greedy generate on the same checkpoint. One request per topology, a tiny clip (8 frames
of 56 x 56) next to an image, so the mixed path is covered too; a broken video is a 400."""

from __future__ import annotations

import base64

import openai
import pytest

from common.prompting import expand_by_kind, mm_message, render_chat
from tests.e2e.conftest import Reference, data_uri
from tests.e2e.stack import running_stack
from tests.reference import hf_greedy, make_image
from tests.video_helpers import make_video, video_item

MAX_TOKENS = 12
QUESTION = "What happens in the video, and what is in the picture?"


def expected_answer(reference, video: bytes, image) -> str:
    fam, tok = reference.loaded.family, reference.loaded.tokenizer
    v_item, plan = video_item(fam, video)
    i_item = fam.preprocess(image)
    items, kinds = [v_item, i_item], ["video", "image"]
    ids = render_chat(tok, mm_message(QUESTION, kinds))
    pads = {"image": fam.image_token_id, "video": fam.video_token_id}
    ids = expand_by_kind(ids, pads, kinds, [fam.num_image_tokens(i) for i in items])
    tokens, _ = hf_greedy(
        reference.model_dir, fam, ids, items, MAX_TOKENS, kinds, [plan.second_per_grid_t, 0.0]
    )
    return tok.decode(tokens, skip_special_tokens=True)


def streamed(client, model: str, messages: list[dict]) -> str:
    """The same request, streamed: its text deltas joined."""
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def video_message(video: bytes, image) -> list[dict]:
    uri = "data:video/mp4;base64," + base64.b64encode(video).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": uri}},
                {"type": "image_url", "image_url": {"url": data_uri(image)}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("topology", "family"),
    [("EPD1", "qwen2_vl"), ("E1 P1 D1", "qwen2_5_vl"), ("EP1 D1", "qwen2_vl"), ("E1 PD1", "qwen2_5_vl")],
)  # each topology once; the split ones also with the family whose positions need the seconds per patch
def test_a_video_request_gets_transformers_answer(topology, family, tmp_path, request):
    """Qwen2.5-VL's temporal positions count seconds: the clip's 0.5 s per temporal patch must reach
    the prefill stage's M-RoPE through the wire."""
    checkpoint = request.getfixturevalue(f"tiny_{family}")
    reference = request.getfixturevalue("reference") if family == "qwen2_vl" else Reference(checkpoint)
    video, image = make_video(8, 56, 56, 8), make_image(84, 56, seed=5)
    expected = expected_answer(reference, video, image)
    assert expected.strip(), "an empty reference answer would prove nothing"
    with running_stack(checkpoint, topology, tmp_path) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=video_message(video, image), max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens > 8 + 12  # 8 video and 12 image placeholder tokens, and text
        assert streamed(client, model, video_message(video, image)) == expected

        with pytest.raises(openai.BadRequestError, match="cannot decode the video"):
            client.chat.completions.create(
                model=model, messages=video_message(b"\x00" * 64 + video[64:], image), max_tokens=2
            )
