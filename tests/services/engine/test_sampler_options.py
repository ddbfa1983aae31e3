"""The logit processors and logprobs against a plain per-row reference written here, on random logits.

Each batch mixes rows with options and rows without: the latter must come out exactly as the plain
sampler gives them, and the logits the model produced must never be written to.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from common.sampling_params import SamplingParams
from services.engine.logits_processors import process_logits
from services.engine.sampler import sample, sample_batch
from services.engine.sequence import Sequence

VOCAB = 64
EOS = (3, 7)


def logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def seq(params: SamplingParams, prompt: list[int], output: list[int] = ()) -> Sequence:
    s = Sequence(f"r{id(params)}", prompt, params)
    s.token_ids += list(output)
    return s


def reference(row: torch.Tensor, s: Sequence, eos=EOS) -> torch.Tensor:
    """vLLM v1's order, one token at a time: logit_bias, min_tokens, repetition, frequency, presence."""
    p, x = s.params, row.float().clone()
    prompt, output = s.token_ids[: s.num_prompt_tokens], s.token_ids[s.num_prompt_tokens :]
    for token, bias in p.logit_bias.items():
        if token < VOCAB:
            x[token] += bias
    if len(output) < p.min_tokens:
        for token in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[token] = float("-inf")
    for token in set(prompt) | set(output):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token, count in Counter(output).items():
        x[token] = x[token] - p.frequency_penalty * count
        x[token] = x[token] - p.presence_penalty
    return x


def mixed_batch() -> list[Sequence]:
    return [
        seq(SamplingParams(), [1, 2, 3], [4, 5]),  # plain greedy
        seq(SamplingParams(repetition_penalty=1.7), [10, 11, 12, 10], [13, 13, 20]),
        seq(SamplingParams(frequency_penalty=1.5, presence_penalty=-0.5), [30], [31, 31, 31, 32]),
        seq(SamplingParams(temperature=0.8, seed=5), [1], [2, 2, 2]),  # plain seeded draw
        seq(SamplingParams(logit_bias={9: 100.0, 40: -100.0, 5000: 3.0}), [2, 2]),
        seq(SamplingParams(min_tokens=3, stop_token_ids=[11]), [1], [2]),
        seq(
            SamplingParams(
                temperature=1.3,
                seed=11,
                repetition_penalty=0.6,
                frequency_penalty=0.4,
                presence_penalty=1.0,
                logit_bias={0: 5.0},
                min_tokens=9,
                max_tokens=16,
            ),
            [5, 6, 7, 8],
            [9, 9, 12],
        ),  # fmt: skip
    ]


def test_processors_equal_the_reference_and_leave_plain_rows_alone():
    seqs = mixed_batch()
    lg = logits(len(seqs))
    raw = lg.clone()
    out = process_logits(lg, seqs, EOS)
    assert torch.equal(lg, raw), "the model's logits were written to"
    for i, s in enumerate(seqs):
        assert torch.allclose(out[i], reference(lg[i], s), atol=1e-6), f"row {i} ({s.params})"
    assert torch.equal(out[0], lg[0]) and torch.equal(out[3], lg[3]), "rows without options changed"


def test_sampled_tokens_equal_the_reference_draw():
    seqs = mixed_batch()
    lg = logits(len(seqs), seed=1)
    tokens = sample_batch(lg, seqs, EOS).tokens
    for i, s in enumerate(seqs):
        alone = sample(reference(lg[i], s)[None], [s.params], [s.num_output_tokens])[0]
        assert tokens[i] == alone, f"row {i} ({s.params})"
    # the rows without options draw exactly what the plain sampler draws for them
    plain = sample(lg, [s.params for s in seqs], [s.num_output_tokens for s in seqs])
    assert (tokens[0], tokens[3]) == (plain[0], plain[3])


def test_a_batch_without_options_costs_nothing():
    seqs = [seq(SamplingParams(), [1]), seq(SamplingParams(temperature=1.0, seed=2), [4, 4], [4])]
    lg = logits(2)
    assert process_logits(lg, seqs, EOS) is lg  # no copy, no kernel: the draw sees the logits as they are
    result = sample_batch(lg, seqs, EOS)
    assert result.tokens == sample(lg, [s.params for s in seqs], [0, 1])
    assert result.logprobs == [None, None]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_bars_eos_and_stop_tokens_until_reached(ignore_eos):
    params = SamplingParams(min_tokens=2, stop_token_ids=[20], ignore_eos=ignore_eos)
    lg = torch.zeros(1, VOCAB)
    lg[0, [EOS[0], EOS[1], 20]] = 10.0
    early = process_logits(lg, [seq(params, [1], [5])], EOS)[0]
    assert early[20] == float("-inf")
    assert (early[list(EOS)] == float("-inf")).all() != ignore_eos  # ignore_eos: EOS ends nothing anyway
    reached = process_logits(lg, [seq(params, [1], [5, 6])], EOS)[0]
    assert torch.equal(reached, lg[0]), "min_tokens reached: nothing is barred any more"
    assert sample_batch(lg, [seq(params, [1], [5])], EOS).tokens[0] == (EOS[0] if ignore_eos else 0)


def test_repetition_penalty_covers_the_prompt_and_the_output_and_divides_positive_logits():
    lg = torch.zeros(1, VOCAB)
    lg[0, [1, 2, 3, 4]] = torch.tensor([2.0, -2.0, 2.0, 2.0])
    out = process_logits(lg, [seq(SamplingParams(repetition_penalty=2.0), [1, 2], [3])], EOS)[0]
    assert out[[1, 2, 3, 4]].tolist() == [1.0, -4.0, 1.0, 2.0]  # 4 was never seen


def test_frequency_and_presence_penalties_count_the_output_only():
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(torch.zeros(1, VOCAB), [seq(params, [8, 8, 8], [9, 9, 9, 10])], EOS)[0]
    assert out[[8, 9, 10, 11]].tolist() == [0.0, -1.75, -0.75, 0.0]


def test_logprobs_are_the_raw_log_softmax_at_the_token_and_its_top_n():
    seqs = [
        seq(SamplingParams(logprobs=5, repetition_penalty=1.5), [1, 2], [3]),
        seq(SamplingParams(), [1]),
        seq(SamplingParams(logprobs=0, temperature=1.0, seed=3, logit_bias={17: 50.0}), [1]),
        seq(SamplingParams(logprobs=20), [4]),
    ]
    lg = logits(len(seqs), seed=2)
    result = sample_batch(lg, seqs, EOS)
    assert result.logprobs[1] is None
    assert result.tokens[2] == 17  # the bias decided the draw; the logprob is still the model's
    for i in (0, 2, 3):
        raw = torch.log_softmax(lg[i].float(), -1)
        lp, n = result.logprobs[i], seqs[i].params.logprobs
        assert len(lp) == 1 and abs(lp.token_logprobs[0] - float(raw[result.tokens[i]])) < 1e-6
        values, ids = raw.topk(n) if n else (raw[:0], raw[:0].long())
        assert lp.top_token_ids[0] == ids.tolist(), f"row {i}"
        assert torch.allclose(torch.tensor(lp.top_logprobs[0]), values, atol=1e-6)


def test_bias_past_the_vocabulary_is_ignored_and_ids_within_it_are_not():
    params = SamplingParams(logit_bias={VOCAB: 100.0, VOCAB - 1: 100.0})
    assert sample_batch(logits(1), [seq(params, [1])], EOS).tokens == [VOCAB - 1]


def test_half_precision_logits_are_processed_in_float32():
    seqs = mixed_batch()
    lg = logits(len(seqs)).bfloat16()
    out = process_logits(lg, seqs, EOS)
    assert out.dtype == torch.float32
    for i, s in enumerate(seqs):
        assert torch.allclose(out[i], reference(lg[i], s), atol=1e-6), f"row {i}"
    lp = sample_batch(lg, [seq(SamplingParams(logprobs=3, presence_penalty=1.0), [1], [2])], EOS).logprobs[0]
    assert lp.top_logprobs[0] == torch.log_softmax(lg[0].float(), -1).topk(3).values.tolist()
