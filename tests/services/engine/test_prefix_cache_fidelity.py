"""A prompt served from cached blocks answers exactly like one computed afresh, and like transformers.

Prompts share prefixes the way users' do: the same image with another question, the same prompt again,
and a picture of the same size (so the same token ids) that is another picture, which must not share
past its first placeholder. Requests run one after the other and then together (a prompt attaching
blocks another request is still decoding from), through the sdpa and the flex backends.
"""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.llm import LLM
from tests.reference import hf_greedy, make_image, max_logit_diff
from tests.services.engine.test_fidelity import prompt

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tiny_qwen2_vl):
    """One family: the cache is family-independent (keys are tokens and content hashes), and
    M-RoPE with images is the same code path in both."""
    return tiny_qwen2_vl


PICTURE, OTHER = make_image(140, 100, seed=1), make_image(140, 100, seed=2)
QUESTION = "What is in this picture? Answer in one long sentence."
CASES = [
    ("first", QUESTION, PICTURE),
    ("same image, another question", "Describe the colours you can see.", PICTURE),
    ("the same prompt again", QUESTION, PICTURE),
    ("another image of the same size", QUESTION, OTHER),
]


@pytest.fixture(scope="module")
def references(checkpoint, loaded):
    out = {}
    for name, text, image in CASES:
        ids, items = prompt(loaded, text, [image])
        out[name] = (ids, *hf_greedy(checkpoint, loaded.family, ids, items, 12))
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cached_prefixes_give_transformers_answers(backend, loaded, references):
    llm = LLM(
        loaded,
        EngineConfig(num_blocks=256, max_model_len=2048, attention_backend=backend, enforce_eager=True),
        keep_logits=True,
    )
    bm = llm.engine.block_manager
    image_start = references["first"][0].index(loaded.family.image_token_id)
    hits = {}
    for name, text, image in CASES:
        before = bm.hit_tokens
        out = llm.generate(text, [image], SamplingParams(max_tokens=12))
        hits[name] = bm.hit_tokens - before
        ids, ref_tokens, ref_logits = references[name]
        assert out.token_ids == ref_tokens, f"{backend}, {name}: differs from transformers"
        assert max_logit_diff(out.logits, ref_logits) < TOL
    n = len(references["first"][0])
    assert hits["first"] == 0
    assert hits["same image, another question"] > image_start  # the image's blocks were shared
    assert hits["the same prompt again"] == (n - 1) // bm.block_size * bm.block_size
    assert hits["another image of the same size"] <= image_start  # nothing past the placeholders' start

    # all at once: later prompts attach blocks that earlier ones hold while they decode
    ids = {}
    for name, text, image in CASES:
        ids[llm.submit(llm.prepare(text, [image]), SamplingParams(max_tokens=12))] = name
    for done in llm.run():
        ids_, ref_tokens, ref_logits = references[ids[done.request_id]]
        assert done.token_ids == ref_tokens, f"{backend}, together, {ids[done.request_id]}"
        assert max_logit_diff(done.logits, ref_logits) < TOL
    assert bm.num_free_blocks == bm.num_blocks
