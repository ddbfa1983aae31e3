"""Sampling: greedy is argmax; seeded draws depend only on (seed, token index); filters cut right."""

from __future__ import annotations

import torch

from common.sampling_params import SamplingParams
from services.engine.sampler import sample


def logits(batch=4, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    lg = logits()
    assert sample(lg, [SamplingParams()] * 4, [0] * 4) == lg.argmax(-1).tolist()


def test_seeded_draw_is_repeatable_and_independent_of_the_batch():
    lg = logits(batch=1)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(lg, [p], [i])[0] for i in range(20)]
    again = [sample(lg, [p], [i])[0] for i in range(20)]
    assert alone == again
    # the same row inside a batch of other requests (greedy, unseeded, other seeds) draws the same
    others = logits(batch=3, seed=1)
    mixed = torch.cat([others[:2], lg, others[2:]])
    params = [SamplingParams(), SamplingParams(temperature=0.7), p, SamplingParams(temperature=1.0, seed=9)]
    in_batch = [sample(mixed, params, [5, 5, i, 5])[2] for i in range(20)]
    assert in_batch == alone
    assert len(set(alone)) > 3, "a temperature-1 draw over 50 tokens should vary from token to token"


def test_top_k_one_and_tiny_top_p_are_greedy():
    lg = logits()
    greedy = lg.argmax(-1).tolist()
    assert sample(lg, [SamplingParams(temperature=1.0, top_k=1)] * 4, [0] * 4) == greedy
    assert sample(lg, [SamplingParams(temperature=1.0, top_p=1e-6)] * 4, [0] * 4) == greedy


def test_top_k_only_draws_from_the_k_best():
    lg = logits(batch=1, vocab=100)
    best = set(torch.topk(lg[0], 5).indices.tolist())
    draws = {sample(lg, [SamplingParams(temperature=2.0, top_k=5, seed=s)], [0])[0] for s in range(200)}
    assert draws <= best and len(draws) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample(lg, [SamplingParams(temperature=1.0, top_p=0.8, seed=s)], [0])[0] for s in range(300)}
    assert draws == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    lg = torch.log(probs)[None]
    n = 3000
    counts = torch.zeros(3)
    for s in range(n):
        counts[sample(lg, [SamplingParams(temperature=1.0, seed=s)], [0])[0]] += 1
    assert torch.allclose(counts / n, probs, atol=0.03), counts / n


def test_temperatures_below_the_epsilon_are_greedy_not_nan():
    # dividing by 1e-40 overflows float32 to inf and the softmax to NaN, whose argmax is token 0
    lg = logits()
    lg[:, 0] = lg.min() - 1  # token 0 is nobody's best, so a NaN draw would show
    greedy = lg.argmax(-1).tolist()
    for temperature in (1e-40, 1e-30, 9e-6):
        params = [SamplingParams(temperature=temperature, seed=s) for s in range(4)]
        assert sample(lg, params, [0] * 4) == greedy, temperature


def test_a_nan_temperature_that_reaches_the_sampler_is_greedy():
    lg = logits()
    lg[:, 0] = lg.min() - 1
    p = SamplingParams(temperature=1.0)
    p.temperature = float("nan")  # past the params' own checks, as a decoded wire message might be
    assert sample(lg, [p] * 4, [0] * 4) == lg.argmax(-1).tolist()


def test_a_huge_temperature_never_draws_a_masked_token():
    # 1e39 is a finite float64 but inf in float32, and -inf / inf is NaN
    lg = torch.tensor([[float("-inf"), 1.0, 2.0, 3.0]])
    draws = {sample(lg, [SamplingParams(temperature=1e39, seed=s)], [0])[0] for s in range(100)}
    assert draws == {1, 2, 3}, draws
