"""Video prompts: our encoder, feature scatter and M-RoPE give transformers' greedy tokens and logits.

The reference is transformers' own `generate(do_sample=False)` on the same tiny checkpoint, in fp32,
fed `pixel_values_videos` and `video_grid_thw` (and, for Qwen2.5-VL, `second_per_grid_ts`) made from
the documented formula with the gateway's frame plan (tests/video_helpers.py). Our side runs the
vision tower with the video grid, `model_inputs` with both grids, and the engine's paged attention.
"""

from __future__ import annotations

import pytest

from common.prompting import expand_by_kind, mm_message, render_chat
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from tests.reference import hf_greedy, make_image, max_logit_diff
from tests.video_helpers import make_video, video_item

TOL = 1e-4
MAX_TOKENS = 16


def mixed_prompt(loaded, text, media):
    """Token ids and items for `media`: ("image", PIL image) or ("video", bytes), in prompt order."""
    fam = loaded.family
    items, kinds, seconds = [], [], []
    for kind, value in media:
        if kind == "image":
            items.append(fam.preprocess(value))
            seconds.append(0.0)
        else:
            item, plan = video_item(fam, value)
            items.append(item)
            seconds.append(plan.second_per_grid_t)
        kinds.append(kind)
    ids = render_chat(loaded.tokenizer, mm_message(text, kinds))
    pads = {"image": fam.image_token_id, "video": fam.video_token_id}
    ids = expand_by_kind(ids, pads, kinds, [fam.num_image_tokens(i) for i in items])
    return ids, items, kinds, seconds


def ours(loaded, ids, items, kinds, seconds):
    fam = loaded.family
    engine = Engine(
        fam, loaded.eos_token_ids, EngineConfig(num_blocks=128, max_model_len=2048), keep_logits=True
    )
    inputs = fam.model_inputs(ids, [i.grid_thw for i in items], fam.encode(items), kinds, seconds)
    engine.add_request("r", ids, SamplingParams(max_tokens=MAX_TOKENS), inputs)
    tokens, logits = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logits.append(out.logits)
    return tokens, logits


CASES = {
    # 12 frames at 12 fps: 1 s gives 2 frames at 2 fps, raised to min_frames 4; 0.5 s per grid step
    "one_video": ("What happens in this video?", [("video", (12, 84, 112, 12, 0))]),
    "video_then_image": (
        "Does the picture appear in the video?",
        [("video", (16, 112, 56, 4, 1)), ("image", (140, 100))],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_video_greedy_matches_transformers(case, checkpoint, loaded):
    text, spec = CASES[case]
    media = [
        (kind, make_video(*args) if kind == "video" else make_image(*args, seed=3)) for kind, args in spec
    ]
    ids, items, kinds, seconds = mixed_prompt(loaded, text, media)
    assert ids.count(loaded.family.video_token_id) > 0
    ref_tokens, ref_logits = hf_greedy(checkpoint, loaded.family, ids, items, MAX_TOKENS, kinds, seconds)
    tokens, logits = ours(loaded, ids, items, kinds, seconds)
    diff = max_logit_diff(logits, ref_logits)
    grids = [i.grid_thw for i in items]
    print(f"{case}: grids {grids}, seconds {seconds}, {len(ids)} prompt tokens, max logit diff {diff:.2e}")
    assert tokens == ref_tokens
    assert diff < TOL


def test_second_per_grid_t_moves_qwen2_5_vl_positions(checkpoint, loaded):
    """Guards the test above for Qwen2.5-VL, whose temporal positions count seconds: a video's
    `second_per_grid_t` must reach get_rope_index (Qwen2-VL steps time by one per patch; a video there
    takes the positions an image of the same grid would)."""
    if loaded.model_type != "qwen2_5_vl":
        pytest.skip("Qwen2-VL's M-RoPE does not read second_per_grid_ts")
    video = make_video(12, 84, 112, 12)
    ids, items, kinds, seconds = mixed_prompt(loaded, "What happens?", [("video", video)])
    fam = loaded.family
    features = fam.encode(items)
    planned = fam.model_inputs(ids, [items[0].grid_thw], features, kinds, seconds)
    other = fam.model_inputs(ids, [items[0].grid_thw], features, kinds, [2 * seconds[0]])
    assert seconds == [0.5]
    assert not (planned.positions == other.positions).all()
