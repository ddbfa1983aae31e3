"""The oracle: transformers' own `generate(do_sample=False)` on the same checkpoint, plus test inputs."""

from __future__ import annotations

import functools

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
    # M-RoPE types of the kinds the prompt has items of: a placeholder of another kind is text
    types = ("image" in kinds) * (ids == family.image_token_id).int()
    types = types + 2 * ("video" in kinds) * (ids == family.video_token_id).int()
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


def max_logit_diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    assert len(ours) == len(ref), f"{len(ours)} logits rows vs {len(ref)} from the reference"
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, ref, strict=True))
