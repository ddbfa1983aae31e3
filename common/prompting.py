"""Torch-free prompt helpers: chat rendering and placeholder expansion.

A chat template renders one `<|image_pad|>` per image (one `<|video_pad|>` per video); the model needs
one per feature row the encoder makes for that item, a count known from the image's size alone (see
`vision_geometry`), or from a video's frame plan (`video_plan`). Expanding here,
without torch, is what lets the gateway tokenize and route a request before any encoder has run.
The engine, the benchmarks and the tests render prompts with the same helpers, so the module lives in
`common/`: the gateway imports nothing from `services/`.
"""

from __future__ import annotations

from typing import Any

from common.placeholder_runs import expand_items


def expand_placeholders(
    token_ids: list[int], placeholder_id: int, counts: list[int], kind: str = "image"
) -> list[int]:
    """Replace the i-th `placeholder_id` by `counts[i]` copies of it (`kind` names the items in errors).

    Placeholders past the items' (typed in the text), and all of them where the kind has no items
    (`counts` empty), are plain tokens and stay (common/placeholder_runs.py)."""
    try:
        return expand_items(token_ids, placeholder_id, [[placeholder_id] * n for n in counts])
    except ValueError:
        found = token_ids.count(placeholder_id)
        raise ValueError(
            f"the prompt has {found} {kind} placeholders but {len(counts)} {kind}s were given"
        ) from None


def user_message(text: str, num_images: int = 0) -> list[dict[str, Any]]:
    """A one-turn chat: the images first, then the text, as OpenAI-style content parts."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def expand_by_kind(
    token_ids: list[int], placeholder_ids: dict[str, int], kinds: list[str], counts: list[int]
) -> list[int]:
    """Expand each kind's placeholders ({"image": id, "video": id}) with the counts of the items of
    that kind; `kinds` and `counts` list the items in prompt order."""
    for kind, placeholder_id in placeholder_ids.items():
        chosen = [n for k, n in zip(kinds, counts, strict=True) if k == kind]
        token_ids = expand_placeholders(token_ids, placeholder_id, chosen, kind)
    return token_ids


def mm_message(text: str, kinds: list[str]) -> list[dict[str, Any]]:
    """A one-turn chat: one part per item of `kinds` ("image", "video"), in order, then the text."""
    content: list[dict[str, Any]] = [{"type": kind} for kind in kinds]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of `messages` through the checkpoint's own chat template, ready for generation."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def chat_prompt_ids(tokenizer: Any, text: str, image_token_id: int, image_tokens: list[int]) -> list[int]:
    """Prompt ids of a one-turn question after len(image_tokens) images, placeholders expanded:
    the i-th image takes image_tokens[i] copies of `image_token_id`."""
    ids = render_chat(tokenizer, user_message(text, len(image_tokens)))
    return expand_placeholders(ids, image_token_id, image_tokens)
