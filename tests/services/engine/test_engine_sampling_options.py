"""Penalties, logit_bias, min_tokens and logprobs through the engine equal a reference loop on
transformers' model: a full fp32 forward per token, the same ops applied to its logits in the test
(transformers' RepetitionPenaltyLogitsProcessor for the repetition penalty: over prompt and output,
as vLLM's), greedy; logprobs equal log_softmax of the reference's raw logits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from common.prompting import chat_prompt_ids
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.models.loader import load_model
from tests.reference import hf_greedy, hf_model

TOL = 1e-4
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl)


def reference(path, loaded, ids: list[int], params: SamplingParams) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and raw logits, one full forward per token, the processors applied in vLLM's order."""
    model, eos = hf_model(str(path)), set(loaded.eos_token_ids)
    tokens: list[int] = []
    raws: list[torch.Tensor] = []
    while len(tokens) < params.max_tokens:
        x = torch.tensor([ids + tokens])
        with torch.no_grad():
            raw = model(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=torch.zeros_like(x))
        raw = raw.logits[0, -1].float()
        scores = raw.clone()[None]
        for token, bias in params.logit_bias.items():
            scores[0, token] += bias
        if len(tokens) < params.min_tokens:
            scores[0, list(eos | set(params.stop_token_ids))] = float("-inf")
        if params.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(x, scores)
        for token, count in Counter(tokens).items():
            scores[0, token] -= params.frequency_penalty * count
            scores[0, token] -= params.presence_penalty
        tokens.append(int(scores[0].argmax()))
        raws.append(raw)
        if tokens[-1] in eos or tokens[-1] in params.stop_token_ids:
            break
    return tokens, raws


def requests(loaded) -> dict[str, tuple[list[int], SamplingParams]]:
    tok, eos = loaded.tokenizer, loaded.eos_token_ids[0]
    ids = [chat_prompt_ids(tok, text, loaded.family.image_token_id, []) for text in TEXTS]
    return {
        "plain": (ids[0], SamplingParams(max_tokens=MAX_TOKENS, logprobs=2)),
        # a random model never repeats itself: penalties below 0 (or 1) make it, then the others bite
        "repetition": (ids[0], SamplingParams(max_tokens=MAX_TOKENS, repetition_penalty=0.5, logprobs=3)),
        "frequency": (
            ids[1],
            SamplingParams(max_tokens=MAX_TOKENS, frequency_penalty=-1.0, presence_penalty=-2.0),
        ),
        "bias": (
            ids[2],
            SamplingParams(max_tokens=MAX_TOKENS, logit_bias={17: 4.0, 400: -100.0}, logprobs=5),
        ),
        # EOS made the likeliest token: held back for min_tokens, then it ends the request
        "min_tokens": (ids[1], SamplingParams(max_tokens=MAX_TOKENS, min_tokens=5, logit_bias={eos: 100.0})),
        "all": (
            ids[2],
            SamplingParams(
                max_tokens=MAX_TOKENS,
                repetition_penalty=1.8,
                frequency_penalty=-2.0,
                presence_penalty=-1.0,
                logit_bias={5: 2.0},
                logprobs=20,
            ),
        ),  # fmt: skip
    }


TEXTS = ["Tell me a story about a red fox.", "Count the birds", "Describe the sea in great detail"]


def run_engine(loaded, reqs) -> tuple[dict[str, list[int]], dict[str, list]]:
    engine = Engine(loaded.family, loaded.eos_token_ids, EngineConfig(num_blocks=128, max_model_len=1024))
    tokens: dict[str, list[int]] = {rid: [] for rid in reqs}
    logprobs: dict[str, list] = {rid: [] for rid in reqs}
    pending = list(reqs.items())
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:  # joins a running batch: rows with and without options mix
            rid, (ids, params) = pending.pop(0)
            engine.add_request(rid, ids, params)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id].append(out.logprobs)
        step += 1
    return tokens, logprobs


@pytest.fixture(scope="module")
def served(loaded):
    """The requests, and their tokens and logprobs from one engine that batches them together."""
    reqs = requests(loaded)
    return reqs, *run_engine(loaded, reqs)


def test_engine_options_equal_the_reference_loop(tiny_qwen2_vl, loaded, served):
    reqs, tokens, logprobs = served
    for rid, (ids, params) in reqs.items():
        ref_tokens, ref_raw = reference(tiny_qwen2_vl, loaded, ids, params)
        assert tokens[rid] == ref_tokens, f"{rid}: {params}"
        if params.logprobs is None:
            assert logprobs[rid] == [None] * len(ref_tokens)
            continue
        for i, (lp, raw) in enumerate(zip(logprobs[rid], ref_raw, strict=True)):
            ref = torch.log_softmax(raw, -1)
            assert abs(lp.token_logprobs[0] - float(ref[tokens[rid][i]])) < TOL, f"{rid} token {i}"
            top = torch.tensor(lp.top_logprobs[0])
            assert len(top) == params.logprobs
            assert torch.allclose(top, ref.topk(params.logprobs).values, atol=TOL), f"{rid} token {i}"
            assert torch.allclose(top, ref[lp.top_token_ids[0]], atol=TOL), f"{rid} token {i}"


def test_the_options_change_the_output(tiny_qwen2_vl, loaded, served):
    """Guards the test above: each option gives other tokens than plain greedy on this model."""
    reqs, tokens, _ = served
    for rid in ("repetition", "frequency", "bias", "min_tokens", "all"):
        ids, params = reqs[rid]
        plain = hf_greedy(tiny_qwen2_vl, loaded.family, ids, [], params.max_tokens)[0]
        assert tokens[rid] != plain, f"{rid} gives plain greedy's tokens: the test shows nothing"
    assert tokens["min_tokens"] == tokens["min_tokens"][:5] + [loaded.eos_token_ids[0]]
    assert loaded.eos_token_ids[0] not in tokens["min_tokens"][:5]
