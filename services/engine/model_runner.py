"""Turn one scheduled step into tensors, run the model, sample.

A step is a packed batch: the one-token decode rows first, then the prefill chunks, all in a single
sequence of T tokens. Per-step metadata (slot mapping, decode gathers, masks) is built here once,
vectorised over the step, and shared by every layer.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.engine.attention import AttentionMetadata, PrefillSpan
from services.engine.inputs import ModelInputs
from services.engine.kv_cache import KVCache
from services.engine.sampler import sample
from services.engine.scheduler import ScheduledChunk, SchedulerOutput

_NO_INPUTS = ModelInputs()


@dataclass(slots=True)
class StepResult:
    tokens: list[int]  # one per chunk that samples, in chunk order
    logits: torch.Tensor | None  # [len(tokens), vocab] when asked for


class ModelRunner:
    def __init__(self, family, kv: KVCache) -> None:
        self.family = family
        self.kv = kv
        self.device = kv.device
        self.block_size = kv.block_size
        # called as hook(layer_index, chunks that complete their prompt in this step)
        self.layer_hook: Callable[[int, list[ScheduledChunk]], None] | None = None

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, keep_logits: bool = False) -> StepResult:
        chunks = step.chunks
        token_ids = torch.tensor(
            [t for c in chunks for t in c.seq.token_ids[c.start : c.start + c.num_tokens]],
            dtype=torch.long,
            device=self.device,
        )
        embeds = self.family.embed(token_ids)
        positions = torch.empty(3, len(token_ids), dtype=torch.long, device=self.device)
        meta = self._metadata(chunks, embeds, positions)
        if self.layer_hook is not None:
            finishing = [c for c in chunks if c.samples and not c.is_decode]
            if finishing:
                hook = self.layer_hook
                meta.on_layer = lambda layer: hook(layer, finishing)
        hidden = self.family.forward(embeds, positions, meta)

        sampling = [c for c in chunks if c.samples]
        if not sampling:
            return StepResult([], None)
        rows = torch.tensor(self._sample_rows(chunks), device=self.device)
        logits = self.family.logits(hidden[rows])
        tokens = sample(logits, [c.seq.params for c in sampling], [c.seq.num_output_tokens for c in sampling])
        return StepResult(tokens, logits if keep_logits else None)

    # ---- metadata --------------------------------------------------------------------------------

    @staticmethod
    def _sample_rows(chunks: list[ScheduledChunk]) -> list[int]:
        rows, offset = [], 0
        for c in chunks:
            offset += c.num_tokens
            if c.samples:
                rows.append(offset - 1)
        return rows

    def _block_tables(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        width = max(len(c.seq.block_table) for c in chunks)
        table = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, c in enumerate(chunks):
            table[i, : len(c.seq.block_table)] = torch.tensor(c.seq.block_table, dtype=torch.long)
        return table

    def _slots(self, table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return table[rows, pos // self.block_size] * self.block_size + pos % self.block_size

    def _metadata(
        self, chunks: list[ScheduledChunk], embeds: torch.Tensor, positions: torch.Tensor
    ) -> AttentionMetadata:
        """Fill `positions` and the multimodal rows of `embeds` in place; return attention metadata."""
        table = self._block_tables(chunks)
        num_decodes = sum(1 for c in chunks if c.is_decode)
        lengths = torch.tensor([c.num_tokens for c in chunks])
        starts = torch.tensor([c.start for c in chunks])
        rows = torch.repeat_interleave(torch.arange(len(chunks)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        pos = starts[rows] + torch.arange(len(rows)) - first[rows]  # token index within its sequence
        slot_mapping = self._slots(table, rows, pos)

        meta = AttentionMetadata(self.kv, slot_mapping.to(self.device), num_decodes=num_decodes)
        if num_decodes:
            deltas = torch.tensor([_inputs(c).rope_delta for c in chunks[:num_decodes]])
            positions[:, :num_decodes] = (starts[:num_decodes] + deltas).to(self.device)
            context = starts[:num_decodes] + 1
            width = -(-int(context.max()) // self.block_size)
            j = torch.arange(width * self.block_size)
            meta.decode_blocks = table[:num_decodes, :width].reshape(-1).to(self.device)
            meta.decode_mask = (j[None, :] < context[:, None]).view(num_decodes, 1, 1, -1).to(self.device)

        q = num_decodes
        for i in range(num_decodes, len(chunks)):
            c = chunks[i]
            n, end = c.num_tokens, c.start + c.num_tokens
            self._prefill_positions_and_features(c, q, embeds, positions)
            span = PrefillSpan(q, q + n)
            if c.start > 0:
                width = -(-end // self.block_size)
                j = torch.arange(width * self.block_size)
                span.blocks = table[i, :width].to(self.device)
                span.mask = (j[None, :] <= torch.arange(c.start, end)[:, None]).to(self.device)
            meta.prefills.append(span)
            q += n
        return meta

    def _prefill_positions_and_features(
        self, c: ScheduledChunk, q: int, embeds: torch.Tensor, positions: torch.Tensor
    ) -> None:
        inputs = _inputs(c)
        end = c.start + c.num_tokens
        n_prompt = c.seq.num_prompt_tokens
        if inputs.positions is None:
            positions[:, q : q + c.num_tokens] = torch.arange(c.start, end, device=self.device)
        else:
            # prompt tokens take their M-RoPE positions; tokens past the prompt (a recomputed output)
            # continue at index + rope_delta
            in_prompt = max(0, min(end, n_prompt) - c.start)
            positions[:, q : q + in_prompt] = inputs.positions[:, c.start : c.start + in_prompt]
            if in_prompt < c.num_tokens:
                tail = torch.arange(c.start + in_prompt, end, device=self.device) + inputs.rope_delta
                positions[:, q + in_prompt : q + c.num_tokens] = tail
        if inputs.mm_embeds is not None:
            idx = inputs.mm_token_indices
            lo, hi = bisect.bisect_left(idx, c.start), bisect.bisect_left(idx, end)
            if hi > lo:
                at = torch.tensor(idx[lo:hi], device=self.device) - c.start + q
                embeds[at] = inputs.mm_embeds[lo:hi].to(embeds.dtype)


def _inputs(chunk: ScheduledChunk) -> ModelInputs:
    return chunk.seq.model_inputs or _NO_INPUTS
