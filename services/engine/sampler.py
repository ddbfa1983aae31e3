"""Turn logits into next tokens: greedy, temperature, top-k, top-p, per-request seed; one batch at once.

Every sampled row goes through the same few batched operations, whatever mix of parameters the batch
holds (no per-row Python loop, a fixed number of kernels on an accelerator): divide by the row's
temperature, sort once, cut the sorted rows by top-k then top-p, and draw by the exponential race
(argmax of probs / Exp(1) noise, the same distribution as a multinomial draw).

A seeded row's noise is a pure function of (seed, index of the token in the output, vocabulary id): a
counter-based hash (SplitMix64) computed with integer tensor ops, so the draw depends on nothing else:
not on the batch, not on the process, not on the device, not on earlier calls. Unseeded rows draw from
the process's generator.

`sample_batch` is the whole step, as vLLM v1 orders it: the logit processors (`logits_processors.py`:
logit_bias, min_tokens, penalties) on float32 logits, then the draw. Logprobs are taken from the raw
logits the model produced, before any processor or temperature (vLLM's default `raw_logprobs`): what
the model thinks of each token, whatever the request did to pick one (`docs/sampling.md`).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from common.logprobs import Logprobs
from common.sampling_params import SAMPLING_EPS, SamplingParams
from services.engine.logits_processors import process_logits
from services.engine.sequence import Sequence

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
    return _draw(logits, params, output_indices).tolist()


def _draw(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> torch.Tensor:
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if _drawn(p)]
    if not rows:
        return tokens
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
    return tokens


@dataclass(slots=True)
class SamplerOutput:
    tokens: list[int]  # one per row
    logprobs: list[Logprobs | None]  # one per row: None where the request asked for none


def sample_batch(
    logits: torch.Tensor, seqs: Seq[Sequence], eos_token_ids: Iterable[int] = ()
) -> SamplerOutput:
    """The next token of each sequence (row i of `logits` is `seqs[i]`'s), with its logprobs when the
    request asked for them. `eos_token_ids` are what `min_tokens` holds back."""
    params = [s.params for s in seqs]
    processed = process_logits(logits, seqs, eos_token_ids)
    tokens = _draw(processed, params, [s.num_output_tokens for s in seqs])
    return SamplerOutput(tokens.tolist(), _logprobs(logits, tokens, params))


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[Logprobs | None]:
    """Per row that asks: log_softmax of its raw logits at the drawn token and at its top-N."""
    out: list[Logprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    at = torch.tensor(rows, device=raw.device)
    logprobs = raw[at].float().log_softmax(-1)
    chosen = logprobs.gather(1, tokens[at, None]).squeeze(1).tolist()
    k = min(max(params[i].logprobs or 0 for i in rows), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs or 0
        out[i] = Logprobs([chosen[j]], [top_ids[j][:n]], [top_values[j][:n]])
    return out
