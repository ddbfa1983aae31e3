"""End-to-end fixtures: references computed with transformers on the same tiny checkpoint."""

from __future__ import annotations

import asyncio
import base64
import io

import openai
import pytest

from common.prompting import chat_prompt_ids
from services.models.loader import load_model
from tests.reference import hf_greedy, make_image

QUESTION = "What is in this picture?"


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(image, text: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(image)}},
                {"type": "text", "text": text},
            ],
        }
    ]


async def _ask_all(base_url: str, model: str, images, max_tokens: int) -> list[str]:
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=180)
    try:
        replies = await asyncio.gather(
            *(
                aclient.chat.completions.create(
                    model=model, messages=image_message(img), max_tokens=max_tokens, temperature=0
                )
                for img in images
            )
        )
    finally:
        await aclient.close()
    return [r.choices[0].message.content for r in replies]


def ask_concurrently(base_url: str, model: str, images, max_tokens: int) -> list[str]:
    """Greedy answers to one question per image, all sent at once (the official async client)."""
    return asyncio.run(_ask_all(base_url, model, images, max_tokens))


class Reference:
    """transformers' greedy answer, as text, for a question about an image."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.loaded = load_model(model_dir)

    def answer(self, image, max_tokens: int, text: str = QUESTION) -> str:
        fam, tok = self.loaded.family, self.loaded.tokenizer
        item = fam.preprocess(image)
        ids = chat_prompt_ids(tok, text, fam.image_token_id, [fam.num_image_tokens(item)])
        tokens, _ = hf_greedy(self.model_dir, fam, ids, [item], max_tokens)
        return tok.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="session")
def reference(tiny_qwen2_vl):
    return Reference(tiny_qwen2_vl)


@pytest.fixture(scope="session")
def images():
    sizes = [(140, 100), (224, 168), (84, 308), (56, 56), (196, 140), (112, 224), (280, 84), (168, 168)]
    return [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
