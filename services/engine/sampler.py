"""Turn logits into next tokens: greedy, temperature, top-k, top-p, per-request seed.

Greedy rows take an argmax over the whole batch at once. Sampled rows draw with the exponential-race
trick (argmax of probs / Exp(1) noise, the same distribution as a multinomial draw). A seeded row draws
its noise from a generator seeded by (seed, index of the token in the output), so the draw depends on
nothing else: not on the batch, not on the process, not on earlier calls.
"""

from __future__ import annotations

import torch

from common.sampling_params import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over the seed space


def token_seed(seed: int, output_index: int) -> int:
    return (seed * _MIX + output_index) % (2**63 - 1)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> list[int]:
    """One token per row of `logits` [B, V]; `output_indices[i]` is the index that token will have in
    its request's output (0 for the first token)."""
    tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    for i in sampled_rows:
        p = params[i]
        row = _filter_top_k_top_p(logits[i].float() / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(token_seed(p.seed, output_indices[i]))
        noise = torch.empty_like(probs).exponential_(generator=generator)
        tokens[i] = (probs / noise).argmax()
    return tokens.tolist()
