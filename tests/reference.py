"""The oracle: transformers' own `generate(do_sample=False)` on the same checkpoint, plus test inputs."""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText


@functools.cache
def hf_model(path: str):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_greedy(
    path: str,
    family,
    token_ids: list[int],
    items: list,
    max_new_tokens: int,
    kinds: list[str] | None = None,
    second_per_grid_ts: list[float] | None = None,
    encoder_dtype: str | None = None,
):
    """Greedy tokens and per-token logits of transformers' generate for one prompt (stops at EOS).

    `items` are images unless `kinds` says "video" for some: those go in as `pixel_values_videos`
    and `video_grid_thw`; `second_per_grid_ts` (one per item, read for videos) goes to Qwen2.5-VL."""
    if encoder_dtype is None:
        model = hf_model(str(path))
    else:  # a model of its own (never the cached one): the vision tower alone cast, as --encoder-dtype does
        model = hf_model.__wrapped__(str(path))
        model.model.visual.to(getattr(torch, encoder_dtype))
    ids = torch.tensor([token_ids])
    kinds = kinds or ["image"] * len(items)
    kwargs = {}
    for kind, pixels, grids in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        chosen = [i for i, k in zip(items, kinds, strict=True) if k == kind]
        if chosen:
            kwargs[pixels] = torch.cat([i.pixel_values for i in chosen])
            kwargs[grids] = torch.tensor([i.grid_thw for i in chosen])
    if second_per_grid_ts is not None and "video" in kinds and model.config.model_type == "qwen2_5_vl":
        videos = [s for s, k in zip(second_per_grid_ts, kinds, strict=True) if k == "video"]
        kwargs["second_per_grid_ts"] = torch.tensor(videos)
    # M-RoPE types: a kind's first placeholders, as many as its items take, are theirs (the template
    # writes each item's before any typed in the text); the rest, and any of a kind with no items, text
    types = torch.zeros_like(ids, dtype=torch.int)
    strays = False
    for code, kind, pad in ((1, "image", family.image_token_id), (2, "video", family.video_token_id)):
        chosen = [i for i, k in zip(items, kinds, strict=True) if k == kind]
        total = sum(math.prod(i.grid_thw) // family.merge_size**2 for i in chosen)
        where = (ids[0] == pad).nonzero().flatten()
        types[0, where[:total]] = code
        strays |= bool(total) and len(where) > total
    with _features_at(model, types) if strays else contextlib.nullcontext():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=types,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    tokens = out.sequences[0, len(token_ids) :].tolist()
    return tokens, [lg[0] for lg in out.logits]


@contextlib.contextmanager
def _features_at(model, types: torch.Tensor):
    """transformers scatters features at every placeholder id and refuses a count that differs; for
    a prompt with one typed in its text as well, scatter them at the items' positions (`types`)
    instead. Only where the features go changes: the model computes everything else as it does."""

    def masks(input_ids, inputs_embeds, image_features=None, video_features=None):
        image, video = ((types == code).unsqueeze(-1).expand_as(inputs_embeds) for code in (1, 2))
        return image.to(inputs_embeds.device), video.to(inputs_embeds.device)

    model.model.get_placeholder_mask = masks
    try:
        yield
    finally:
        del model.model.get_placeholder_mask


def max_logit_diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    assert len(ours) == len(ref), f"{len(ours)} logits rows vs {len(ref)} from the reference"
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, ref, strict=True))
