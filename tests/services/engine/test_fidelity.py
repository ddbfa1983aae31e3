"""Greedy tokens of our engine equal transformers' generate on the same checkpoint, logits too."""

from __future__ import annotations

import pytest
import torch

from common.prompting import chat_prompt_ids
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.llm import LLM
from tests.reference import hf_greedy, make_image, max_logit_diff
from tests.services.engine.packed_batch import run_batch
from tests.services.engine.split import split_generate

TOL = 1e-4


def prompt(loaded, text, images):
    fam = loaded.family
    items = [fam.preprocess(img) for img in images]
    ids = chat_prompt_ids(
        loaded.tokenizer, text, fam.image_token_id, [fam.num_image_tokens(i) for i in items]
    )
    return ids, items


CASES = {
    "text_only": ("Tell me a story about a red fox.", []),
    "one_image": ("What is in this picture?", [(140, 100)]),
    "two_images_of_different_sizes": ("Compare the two pictures.", [(224, 168), (84, 308)]),
    # placeholders of a kind the prompt has no items of are ordinary tokens, in transformers as here
    "a_video_pad_typed_beside_an_image": ("Is <|video_pad|> in this picture?", [(140, 100)]),
    "placeholders_typed_in_text_only": ("Is <|image_pad|> a <|video_pad|>?", []),
    # past the items' own, a placeholder of their kind is text too, as vLLM serves it
    "an_image_pad_typed_after_an_image": ("And is <|image_pad|> in it?", [(140, 100)]),
    "two_images_and_two_image_pads_typed": ("Is <|image_pad|> like <|image_pad|>?", [(224, 168), (84, 308)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, checkpoint, loaded):
    text, sizes = CASES[case]
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    llm = LLM(loaded, EngineConfig(num_blocks=128, max_model_len=2048), keep_logits=True)
    ids, items = prompt(loaded, text, images)
    fam = loaded.family
    typed = text.count("<|image_pad|>"), text.count("<|video_pad|>")  # each one token of its own
    assert (ids.count(fam.image_token_id), ids.count(fam.video_token_id)) == (
        typed[0] + sum(fam.num_image_tokens(i) for i in items),
        typed[1],
    )
    ref_tokens, ref_logits = hf_greedy(checkpoint, fam, ids, items, 24)
    out = llm.generate(text, images, SamplingParams(max_tokens=24))
    diff = max_logit_diff(out.logits, ref_logits)
    print(f"{case}: {len(ids)} prompt tokens, {len(ref_tokens)} generated, max logit diff {diff:.2e}")
    assert out.token_ids == ref_tokens
    assert diff < TOL


def make_batch(loaded, n=10):
    """Mixed prompts: text-only and 1-2 images of varied sizes, varied output lengths."""
    sizes = [(56, 56), (140, 100), (224, 168), (84, 308), (196, 196)]
    batch = []
    for i in range(n):
        imgs = [make_image(*sizes[(i + k) % len(sizes)], seed=10 * i + k) for k in range(i % 3)]
        text = "Describe the scene " + "in great detail " * (i % 4)
        ids, items = prompt(loaded, text, imgs)
        batch.append((f"r{i}", ids, items, 8 + 3 * i))
    return batch


def test_continuous_batch_with_joins_and_chunked_prefill_matches_transformers(checkpoint, loaded):
    fam = loaded.family
    # a small token budget forces prompts through several prefill chunks while others decode
    engine = Engine(
        fam,
        loaded.eos_token_ids,
        EngineConfig(num_blocks=256, max_model_len=2048, max_num_batched_tokens=48),
        keep_logits=True,
    )
    batch = make_batch(loaded)
    tokens, logits, max_packed = run_batch(engine, loaded, batch)
    assert max_packed >= 4, "requests should have overlapped in the running batch"
    worst = 0.0
    for rid, ids, items, n in batch:
        ref_tokens, ref_logits = hf_greedy(checkpoint, fam, ids, items, n)
        assert tokens[rid] == ref_tokens, f"{rid} ({len(ids)} prompt tokens) differs from transformers"
        worst = max(worst, max_logit_diff(logits[rid], ref_logits))
    print(f"batch of {len(batch)}: up to {max_packed} running, max logit diff {worst:.2e}")
    assert worst < TOL
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


SPLIT = EngineConfig(num_blocks=128, max_model_len=2048)


def split(loaded, ids, items, max_tokens, forget_rope_delta=False):
    """A prefill-only engine, then a decode engine whose reserved blocks receive the KV as bytes."""
    params = SamplingParams(max_tokens=max_tokens)
    return split_generate(
        loaded, ids, items, params, SPLIT, keep_logits=True, forget_rope_delta=forget_rope_delta
    )


def test_prefill_then_decode_through_reserved_blocks_matches_transformers(checkpoint, loaded):
    ids, items = prompt(loaded, "What is in this picture?", [make_image(224, 168), make_image(56, 112, 1)])
    ref_tokens, ref_logits = hf_greedy(checkpoint, loaded.family, ids, items, 24)
    tokens, logits = split(loaded, ids, items, 24)
    diff = max_logit_diff(logits, ref_logits)
    print(f"split path: max logit diff {diff:.2e}")
    assert tokens == ref_tokens
    assert diff < TOL


def test_wrong_rope_delta_changes_the_output(checkpoint, loaded):
    """Guards the test above: a decode stage that forgets rope_delta must not match."""
    ids, items = prompt(loaded, "What is in this picture?", [make_image(224, 168)])
    good_tokens, good_logits = split(loaded, ids, items, 12)
    bad_tokens, bad_logits = split(loaded, ids, items, 12, forget_rope_delta=True)
    assert bad_tokens != good_tokens
    assert max_logit_diff(bad_logits[1:], good_logits[1:]) > 1e-2
    assert torch.equal(bad_logits[0], good_logits[0])  # the first token comes from prefill
