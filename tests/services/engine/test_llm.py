"""The monolithic path: stop rules, seeded sampling across batches and across the split path."""

from __future__ import annotations

import pytest

from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.llm import LLM
from services.models.loader import load_model
from tests.reference import make_image
from tests.services.engine.split import split_generate

CONFIG = EngineConfig(num_blocks=256, max_model_len=2048)


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


@pytest.fixture
def llm(loaded):
    return LLM(loaded, CONFIG)


def test_max_tokens_ends_with_length(llm):
    out = llm.generate("Hello there", params=SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_eos_ends_with_stop(llm):
    # a stop token id stands in for EOS: the tiny model's first greedy token becomes the end token
    first = llm.generate("Hello there", params=SamplingParams(max_tokens=1)).token_ids[0]
    out = llm.generate("Hello there", params=SamplingParams(max_tokens=10, stop_token_ids=[first]))
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_stop_string_cuts_the_text(llm):
    full = llm.generate("Say something", params=SamplingParams(max_tokens=30, ignore_eos=True))
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    cut = llm.generate("Say something", params=SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert len(cut.token_ids) < len(full.token_ids)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_prompt_over_the_context_is_refused(loaded):
    small = LLM(loaded, EngineConfig(num_blocks=64, max_model_len=32))
    with pytest.raises(ValueError, match="context is 32 tokens"):
        small.prepare("word " * 40)


SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)


def seeded_alone(llm):
    return llm.generate("Tell me about colours", [make_image(84, 84)], SEEDED).token_ids


def test_seeded_sampling_repeats_run_after_run(llm, loaded):
    first = seeded_alone(llm)
    assert seeded_alone(llm) == first
    assert seeded_alone(LLM(loaded, CONFIG)) == first


def test_seeded_sampling_is_independent_of_the_batch(llm, loaded):
    alone = seeded_alone(llm)
    batch = LLM(loaded, CONFIG)
    for i in range(5):  # other traffic: greedy, unseeded, other seeds, other lengths
        params = SamplingParams(max_tokens=4 + 5 * i, temperature=0.8 * (i % 2), seed=i if i > 2 else None)
        batch.submit(batch.prepare(f"other request {i} " * i, [make_image(56, 112, i)] * (i % 2)), params)
        batch.step()
    rid = batch.submit(batch.prepare("Tell me about colours", [make_image(84, 84)]), SEEDED)
    done = {c.request_id: c for c in batch.run()}
    assert done[rid].token_ids == alone


def test_seeded_sampling_is_the_same_through_the_split_stages(llm, loaded):
    alone = seeded_alone(llm)
    req = llm.prepare("Tell me about colours", [make_image(84, 84)])
    item = loaded.family.preprocess(make_image(84, 84))
    tokens, _ = split_generate(loaded, req.token_ids, [item], SEEDED, CONFIG)
    assert tokens == alone


def test_swapping_under_memory_pressure_keeps_greedy_tokens(loaded):
    """A pool too small for the batch forces swaps; every request still gets its own tokens."""
    roomy = LLM(loaded, CONFIG)
    tight = LLM(loaded, EngineConfig(num_blocks=24, block_size=8, max_model_len=160))
    prompts = [(f"Request number {i} " * (1 + i % 3), [make_image(84, 56, i)] * (i % 2)) for i in range(6)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected, ids = {}, {}
    for i, (text, images) in enumerate(prompts):
        expected[i] = roomy.generate(text, images, params).token_ids
        ids[tight.submit(tight.prepare(text, images), params)] = i
    got = {ids[c.request_id]: c.token_ids for c in tight.run()}
    assert tight.engine.scheduler.num_swap_outs > 0, "the pool should have run out of blocks"
    assert got == expected
    assert tight.engine.block_manager.num_free_blocks == 24
