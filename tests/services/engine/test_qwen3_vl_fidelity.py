"""Qwen3-VL through our engine gives transformers' greedy tokens and logits (fp32, tiny checkpoint).

What is special to Qwen3-VL and checked here: DeepStack features (the encoder's output is wider than
the hidden size, split at prefill and added after the first decoder layers by transformers' own code),
interleaved M-RoPE, and videos whose prompt puts a timestamp before each temporal patch
(common/qwen3_vl_video.py), so `get_rope_index` sees one grid per patch. The reference is
`generate(do_sample=False)` on the same token ids and pixels.
"""

from __future__ import annotations

import re

import pytest
import torch

from common.prompting import mm_message
from common.qwen3_vl_video import frame_timestamps, video_placeholder_text
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.models.loader import load_model
from services.models.qwen2_vl import ImageItem
from services.models.video_patches import video_pixel_values
from tests.reference import hf_greedy, make_image, max_logit_diff
from tests.services.engine.packed_batch import run_batch
from tests.services.engine.split import split_generate
from tests.video_helpers import make_frames

TOL = 1e-4
MAX_TOKENS = 16
VIDEO_FPS = 8.0


@pytest.fixture(scope="module")
def q3(tiny_qwen3_vl):
    return load_model(tiny_qwen3_vl)


def video(fam, count, width, height, seed=0):
    """A video's frames already at a size the processor keeps (multiples of 32), its item and timestamps."""
    s = fam.video_sampling
    pixels, grid = video_pixel_values(
        make_frames(count, width, height, seed), fam.video_norm, patch_size=s.patch_size,
        merge_size=s.merge_size, temporal_patch_size=s.temporal_patch_size,
    )  # fmt: skip
    return ImageItem(pixels, grid), frame_timestamps(range(count), VIDEO_FPS, s.temporal_patch_size)


def prompt(loaded, text, media):
    """Token ids and items, the prompt rendered as `Qwen3VLProcessor` renders it: the chat template's
    text with each pad replaced (a video's by its timestamped runs), then tokenized as a whole."""
    fam = loaded.family
    items, kinds, runs = [], [], []
    for kind, spec in media:
        if kind == "image":
            item = fam.preprocess(make_image(*spec))
            runs.append("<|image_pad|>" * fam.num_image_tokens(item))
        else:
            item, stamps = video(fam, *spec)
            t, h, w = item.grid_thw
            runs.append(video_placeholder_text(stamps, h * w // fam.merge_size**2))
        items.append(item)
        kinds.append(kind)
    chat = loaded.tokenizer.apply_chat_template(
        mm_message(text, kinds), add_generation_prompt=True, tokenize=False
    )
    parts = re.split(r"<\|image_pad\|>|<\|video_pad\|>", chat)
    assert len(parts) == len(runs) + 1
    expanded = parts[0] + "".join(r + p for r, p in zip(runs, parts[1:], strict=True))
    return loaded.tokenizer(expanded)["input_ids"], items, kinds


def ours(loaded, ids, items, kinds, drop_deepstack=False):
    fam = loaded.family
    engine = Engine(
        fam, loaded.eos_token_ids, EngineConfig(num_blocks=128, max_model_len=2048), keep_logits=True
    )
    inputs = fam.model_inputs(ids, [i.grid_thw for i in items], fam.encode(items), kinds)
    if drop_deepstack:
        inputs.deepstack = None
    engine.add_request("r", ids, SamplingParams(max_tokens=MAX_TOKENS), inputs)
    tokens, logits = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logits.append(out.logits)
    return tokens, logits


CASES = {
    "text_only": ("Tell me a story about a red fox.", []),
    "one_image": ("What is in this picture?", [("image", (140, 100, 0))]),
    "two_images": ("Compare the two pictures.", [("image", (224, 168, 0)), ("image", (84, 308, 1))]),
    "one_video": ("What happens in this video?", [("video", (6, 96, 64))]),
    "video_and_image": (
        "Does the picture appear in the video?",
        [("video", (4, 64, 96, 1)), ("image", (112, 140, 2))],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, q3, tiny_qwen3_vl):
    text, media = CASES[case]
    ids, items, kinds = prompt(q3, text, media)
    ref_tokens, ref_logits = hf_greedy(tiny_qwen3_vl, q3.family, ids, items, MAX_TOKENS, kinds=kinds)
    tokens, logits = ours(q3, ids, items, kinds)
    diff = max_logit_diff(logits, ref_logits)
    print(f"{case}: {len(ids)} prompt tokens, {len(ref_tokens)} generated, max logit diff {diff:.2e}")
    assert tokens == ref_tokens
    assert diff < TOL


def test_encoder_output_is_one_tensor_with_the_deepstack_levels(q3):
    fam = q3.family
    (features,) = fam.encode([fam.preprocess(make_image(140, 100))])
    assert fam.deepstack_levels == 2
    assert features.shape[1] == fam.hidden_size * 3 == fam.feature_width


def test_without_deepstack_the_output_differs(q3):
    """Guards the tests above: a runner that dropped the DeepStack rows must not match."""
    ids, items, kinds = prompt(q3, "What is in this picture?", [("image", (140, 100, 0))])
    good_tokens, good_logits = ours(q3, ids, items, kinds)
    bad_tokens, bad_logits = ours(q3, ids, items, kinds, drop_deepstack=True)
    assert max_logit_diff(bad_logits, good_logits) > 1e-2
    assert bad_tokens != good_tokens


def test_chunked_prefill_in_a_packed_batch_matches_transformers(q3, tiny_qwen3_vl):
    """A 48-token budget cuts images across chunks while others decode: each chunk adds its own part
    of an image's DeepStack rows, in a step packed with other requests' rows."""
    fam = q3.family
    sizes = [(56, 56), (140, 100), (224, 168), (84, 308)]
    batch = []
    for i in range(6):
        media = [("image", (*sizes[(i + k) % len(sizes)], 10 * i + k)) for k in range(i % 3)]
        ids, items, _ = prompt(q3, "Describe the scene " + "in detail " * (i % 3), media)
        batch.append((f"r{i}", ids, items, 6 + 2 * i))
    engine = Engine(
        fam, q3.eos_token_ids,
        EngineConfig(num_blocks=256, max_model_len=2048, max_num_batched_tokens=48), keep_logits=True,
    )  # fmt: skip
    tokens, logits, max_packed = run_batch(engine, q3, batch)
    assert max_packed >= 3
    for rid, ids, items, n in batch:
        ref_tokens, ref_logits = hf_greedy(tiny_qwen3_vl, fam, ids, items, n)
        assert tokens[rid] == ref_tokens, rid
        assert max_logit_diff(logits[rid], ref_logits) < TOL


def test_prefill_then_decode_matches_transformers(q3, tiny_qwen3_vl):
    ids, items, kinds = prompt(q3, "What is in these?", [("image", (224, 168, 0)), ("image", (56, 112, 1))])
    ref_tokens, ref_logits = hf_greedy(tiny_qwen3_vl, q3.family, ids, items, MAX_TOKENS)
    config = EngineConfig(num_blocks=128, max_model_len=2048)
    tokens, logits = split_generate(
        q3, ids, items, SamplingParams(max_tokens=MAX_TOKENS), config, keep_logits=True
    )
    assert tokens == ref_tokens
    assert max_logit_diff(logits, ref_logits) < TOL
    assert torch.is_tensor(logits[0])
