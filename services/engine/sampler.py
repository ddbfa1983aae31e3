"""Turn logits into next tokens: greedy, temperature, top-k, top-p, per-request seed; one batch at once.

Every sampled row goes through the same few batched operations, whatever mix of parameters the batch
holds (no per-row Python loop, a fixed number of kernels on an accelerator): divide by the row's
temperature, sort once, cut the sorted rows by top-k then top-p, and draw by the exponential race
(argmax of probs / Exp(1) noise, the same distribution as a multinomial draw).

A seeded row's noise is a pure function of (seed, index of the token in the output, vocabulary id): a
counter-based hash (SplitMix64) computed with integer tensor ops, so the draw depends on nothing else:
not on the batch, not on the process, not on the device, not on earlier calls. Unseeded rows draw from
the process's generator.
"""

from __future__ import annotations

import torch

from common.sampling_params import SAMPLING_EPS, SamplingParams

_FLOAT32_MAX = torch.finfo(torch.float32).max
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over the seed space


def token_seed(seed: int, output_index: int) -> int:
    return (seed * _MIX + output_index) % (2**63 - 1)


def _i64(x: int) -> int:
    """A 64-bit constant as the signed value an int64 tensor holds."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA, _M1, _M2 = _i64(_MIX), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch shifts signed values arithmetically)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def seeded_exponential(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab], float32, from one 63-bit key per row (SplitMix64 of key + column)."""
    cols = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device)
    z = keys[:, None] + cols[None, :] * _GAMMA  # int64 arithmetic wraps around, as the hash wants
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    uniform = (_shr(z, 11).double() + 0.5) * 2.0**-53  # in (0, 1), never 0
    return (-torch.log(uniform)).float()


def _cut_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Rows of `logits` with every token outside the row's top-k, then outside the smallest set whose
    probability reaches the row's top-p, set to -inf (top_k 0: no cut; top_p 1: no cut)."""
    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    ordered = ordered.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = ordered.softmax(-1)
    # drop a token when the mass before it already reaches top_p (the first token always stays)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop |= rank[None, :] >= k[:, None]
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _drawn(p: SamplingParams) -> bool:
    """Whether a row is drawn rather than greedy. A temperature below SAMPLING_EPS (or NaN) is greedy,
    as in vLLM: dividing logits by it overflows float32 to inf, the softmax turns that into NaN, and
    argmax over NaN picks token 0. Checked here too, whatever the params' own checks let through."""
    return p.temperature >= SAMPLING_EPS


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> list[int]:
    """One token per row of `logits` [B, V]; `output_indices[i]` is the index that token will have in
    its request's output (0 for the first token)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if _drawn(p)]
    if not rows:
        return tokens.tolist()
    device = logits.device
    picked = [params[i] for i in rows]
    temperature = torch.tensor([p.temperature for p in picked], dtype=torch.float32, device=device)
    temperature = temperature.clamp(max=_FLOAT32_MAX)  # 1e39 would be inf, and -inf / inf is NaN
    top_k = torch.tensor([p.top_k for p in picked], device=device)
    top_p = torch.tensor([p.top_p for p in picked], device=device)
    scaled = logits[rows].float() / temperature[:, None]
    if any(p.top_k or p.top_p < 1.0 for p in picked):
        scaled = _cut_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(-1)

    noise = torch.empty_like(probs).exponential_()
    seeded = [j for j, p in enumerate(picked) if p.seed is not None]
    if seeded:
        keys = [token_seed(picked[j].seed, output_indices[rows[j]]) for j in seeded]  # type: ignore[arg-type]
        at = torch.tensor(seeded, device=device)
        noise[at] = seeded_exponential(torch.tensor(keys, dtype=torch.int64, device=device), probs.shape[-1])
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens.tolist()
