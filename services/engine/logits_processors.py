"""The logit processors that run before the draw, in vLLM v1's order: logit_bias, min_tokens, penalties.

Each one picks the rows of the batch that use it and does its work on those rows only, in a few
batched tensor ops (no Python loop over the vocabulary); a batch where no row uses any of them costs
a handful of Python checks over its params and nothing on the device.

- `logit_bias`: the bias is added to the token's logit.
- `min_tokens`: while the output is shorter, the stop token ids and (unless `ignore_eos`) the EOS ids
  get -inf, so the request cannot end early (vLLM's MinTokensLogitsProcessor).
- penalties (vLLM's `apply_penalties`): the repetition penalty divides a positive logit and multiplies
  a negative one, for every token seen in the prompt or the output; then the frequency penalty is
  subtracted once per occurrence in the output, the presence penalty once if it occurs at all. Output
  counts come from one scatter-add into a [rows, vocab] tensor, built each step from the sequences'
  own token lists: the same on a prefill engine that samples token 0 and on a decode engine that
  samples the rest, since a decode engine's sequence holds the prompt and the first token too.

A row's prompt ids are copied to the device once and kept on the sequence (`sampling_cache`).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq

import torch

from services.engine.sequence import Sequence


def process_logits(
    logits: torch.Tensor, seqs: Seq[Sequence], eos_token_ids: Iterable[int] = ()
) -> torch.Tensor:
    """The logits the draw sees: `logits` itself when no row uses a processor (not even a copy), else
    a float32 copy with every processor the rows ask for. `logits` is never written to (the engine
    may hand it out as the model's raw logits)."""
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    barred = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
    penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not (biased or barred or penalized):
        return logits
    work = logits.float()
    if work is logits:
        work = work.clone()
    if biased:
        _add_bias(work, seqs, biased)
    if barred:
        _bar_stops(work, seqs, barred, frozenset(eos_token_ids))
    if penalized:
        _penalize(work, seqs, penalized)
    return work


def _add_bias(work: torch.Tensor, seqs: Seq[Sequence], rows: list[int]) -> None:
    vocab = work.shape[1]
    pairs = [(r, t, b) for r in rows for t, b in seqs[r].params.logit_bias.items() if t < vocab]
    if pairs:
        r, t, b = zip(*pairs, strict=True)
        at = _index(work, r), _index(work, t)
        work.index_put_(at, torch.tensor(b, dtype=work.dtype, device=work.device), accumulate=True)


def _bar_stops(work: torch.Tensor, seqs: Seq[Sequence], rows: list[int], eos: frozenset[int]) -> None:
    """-inf for what would end each row's output before its min_tokens (vLLM: the stop token ids,
    and the EOS ids unless the request ignores EOS, in which case they do not end it anyway)."""
    vocab = work.shape[1]
    pairs = []
    for r in rows:
        params = seqs[r].params
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
        pairs += [(r, t) for t in stops if t < vocab]
    if pairs:
        r, t = zip(*pairs, strict=True)
        work[_index(work, r), _index(work, t)] = float("-inf")


def _penalize(work: torch.Tensor, seqs: Seq[Sequence], rows: list[int]) -> None:
    dev, vocab = work.device, work.shape[1]
    picked = [seqs[r] for r in rows]
    at = _index(work, rows)
    counts = _output_counts(picked, vocab, dev)
    seen = counts > 0
    sub = work[at]
    rep = [s.params.repetition_penalty for s in picked]
    if any(p != 1.0 for p in rep):
        prompts = [_prompt_ids(s, vocab, dev) for s in picked]
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        prompt_rows = torch.repeat_interleave(torch.arange(len(picked), device=dev), lengths)
        seen_any = seen.clone()
        seen_any[prompt_rows, torch.cat(prompts)] = True
        penalty = torch.tensor(rep, dtype=sub.dtype, device=dev)[:, None]
        sub = torch.where(seen_any, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    freq = [s.params.frequency_penalty for s in picked]
    presence = [s.params.presence_penalty for s in picked]
    if any(freq) or any(presence):
        sub -= torch.tensor(freq, dtype=sub.dtype, device=dev)[:, None] * counts
        sub -= torch.tensor(presence, dtype=sub.dtype, device=dev)[:, None] * seen
    work[at] = sub


def _output_counts(seqs: list[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float32: how many times each token occurs in each row's output so far."""
    outputs = [s.token_ids[s.num_prompt_tokens :] for s in seqs]
    flat = torch.tensor([t for out in outputs for t in out], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([len(o) for o in outputs]))
    counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=device)
    if len(flat):
        where = (rows * vocab + flat).to(device, non_blocking=True)
        counts.view(-1).scatter_add_(0, where, torch.ones(len(flat), device=device))
    return counts


def _prompt_ids(seq: Sequence, vocab: int, device: torch.device) -> torch.Tensor:
    """The prompt's token ids on `device` (those within the logits), copied once per sequence."""
    cached = seq.sampling_cache
    if cached is None or cached.device != device:
        ids = torch.tensor(seq.token_ids[: seq.num_prompt_tokens], dtype=torch.long)
        cached = seq.sampling_cache = ids[ids < vocab].to(device)
    return cached


def _index(work: torch.Tensor, values: Iterable[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=work.device)
