"""Turn one scheduled step into tensors, run the model, sample.

A step is a packed batch: the one-token decode rows first, then the prefill chunks, all in a single
sequence of T tokens (padded to what the attention backend wants for static shapes). Its layout (rows,
positions, slots, block tables) is built here once, on the host and vectorised, and copied to the device
in a few transfers; the attention backend turns it into its own per-step state, shared by every layer.
Decode-only steps replay a CUDA graph when the engine has captured them (`decode_graphs.py`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from common.logprobs import Logprobs
from services.engine.attention import AttentionMetadata, StepLayout, create_backend
from services.engine.config import EngineConfig
from services.engine.decode_graphs import DecodeGraphs
from services.engine.host_step import HostStep
from services.engine.inputs import ModelInputs
from services.engine.kv_cache import KVCache
from services.engine.sampler import sample_batch
from services.engine.scheduler import ScheduledChunk, SchedulerOutput

_NO_INPUTS = ModelInputs()

# called as hook(layer index, chunks that complete their prompt in this step) once the layer's keys and
# values are in the pool: a prefill stage ships them while the next layers compute
LayerHook = Callable[[int, list[ScheduledChunk]], None]


@dataclass(slots=True)
class StepResult:
    tokens: list[int]  # one per chunk that samples, in chunk order
    logits: torch.Tensor | None  # [len(tokens), vocab] when asked for
    logprobs: list[Logprobs | None] = field(default_factory=list)  # one per token when not empty


class ModelRunner:
    def __init__(
        self,
        family,
        kv: KVCache,
        config: EngineConfig,
        max_model_len: int,
        decodes: bool = True,  # False for a prefill-only engine: no decode step to capture
        eos_token_ids: Iterable[int] = (),  # what min_tokens holds back
    ) -> None:
        self.family = family
        self.eos_token_ids = frozenset(eos_token_ids)
        self.kv = kv
        self.device = kv.device
        self.block_size = kv.block_size
        self.backend = create_backend(
            config.attention_backend, kv, max_num_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs, max_model_len=max_model_len, compile=not config.enforce_eager,
        )  # fmt: skip
        self.graphs: DecodeGraphs | None = None
        if decodes and self.device.type == "cuda" and not config.enforce_eager and self.backend.graph_safe:
            self.graphs = DecodeGraphs(family, kv, self.backend, max_num_seqs=config.max_num_seqs)
            self.graphs.capture_all()  # at start-up, so that no request waits for a capture

    @torch.inference_mode()
    def execute(
        self, step: SchedulerOutput, keep_logits: bool = False, layer_hook: LayerHook | None = None
    ) -> StepResult:
        chunks = step.chunks
        host = self._host_step(chunks)
        finishing = [c for c in chunks if c.samples and not c.is_decode] if layer_hook else []
        if self.graphs is not None and not finishing and self.graphs.covers(host.layout):
            hidden = self.graphs.run(host)
        else:
            hidden = self._forward(chunks, host, layer_hook, finishing)

        sampling = [c for c in chunks if c.samples]
        if not sampling:
            return StepResult([], None)
        rows = torch.tensor(host.sample_rows, device=self.device)
        logits = self.family.logits(hidden[rows])
        sampled = sample_batch(logits, [c.seq for c in sampling], self.eos_token_ids)
        return StepResult(sampled.tokens, logits if keep_logits else None, sampled.logprobs)

    def _forward(
        self, chunks: list[ScheduledChunk], host: HostStep, layer_hook: LayerHook | None, finishing
    ) -> torch.Tensor:
        dev = self.device
        embeds = self.family.embed(host.token_ids.to(dev, non_blocking=True))
        positions = host.positions.to(dev, non_blocking=True)
        q = host.layout.decode_rows
        deep_rows: list[torch.Tensor] = []  # DeepStack: visual rows of the step, ascending
        deep_feats: list[torch.Tensor] = []  # and their features [rows, levels, hidden]
        for c in chunks[host.layout.num_decodes :]:
            self._multimodal_rows(c, q, embeds, positions, deep_rows, deep_feats)
            q += c.num_tokens
        meta = AttentionMetadata(
            self.kv, host.slots.to(dev, non_blocking=True), self.backend, self.backend.prepare(host.layout)
        )
        if finishing:
            assert layer_hook is not None
            meta.on_layer = lambda layer: layer_hook(layer, finishing)
        if deep_rows:  # only families with DeepStack (Qwen3-VL) set it; decode steps never do
            return self.family.forward(
                embeds, positions, meta, deepstack=(torch.cat(deep_rows), torch.cat(deep_feats))
            )
        return self.family.forward(embeds, positions, meta)

    # ---- the step on the host --------------------------------------------------------------------

    def _host_step(self, chunks: list[ScheduledChunk]) -> HostStep:
        bs = self.block_size
        width = max(len(c.seq.block_table) for c in chunks)
        table = torch.tensor([c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in chunks])
        lengths = torch.tensor([c.num_tokens for c in chunks])
        starts = torch.tensor([c.start for c in chunks])
        n = int(lengths.sum())
        num_decodes = sum(1 for c in chunks if c.is_decode)
        decode_rows, prefill_rows = self.backend.padded_rows(num_decodes, n - num_decodes)
        padded = decode_rows + prefill_rows

        chunk_of = torch.repeat_interleave(torch.arange(len(chunks)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        pos = starts[chunk_of] + torch.arange(n) - first[chunk_of]  # token index within its sequence
        row = torch.arange(n)  # where each token sits among the padded rows
        row[num_decodes:] += decode_rows - num_decodes

        token_ids = torch.zeros(padded, dtype=torch.long)
        token_ids[row] = torch.tensor(
            [t for c in chunks for t in c.seq.token_ids[c.start : c.start + c.num_tokens]]
        )
        # plain positions (index in the sequence; + rope_delta past an M-RoPE prompt) on all three axes;
        # prompt rows with M-RoPE positions are overwritten on the device
        deltas = torch.tensor([_inputs(c).rope_delta if c.is_decode else 0 for c in chunks])
        positions = torch.zeros(3, padded, dtype=torch.long)
        positions[:, row] = pos + deltas[chunk_of]
        slots = torch.full((padded,), self.kv.scratch_slot, dtype=torch.long)
        slots[row] = table[chunk_of, pos // bs] * bs + pos % bs
        token_chunk = torch.full((padded,), -1, dtype=torch.long)
        token_chunk[row] = chunk_of
        token_pos = torch.zeros(padded, dtype=torch.long)
        token_pos[row] = pos
        layout = StepLayout(
            num_tokens=n, padded_tokens=padded, num_decodes=num_decodes, decode_rows=decode_rows,
            chunk_starts=starts.tolist(), chunk_lens=lengths.tolist(), block_table=table,
            token_chunk=token_chunk, token_pos=token_pos,
        )  # fmt: skip
        last = row[torch.cumsum(lengths, 0) - 1].tolist()
        sample_rows = [r for r, c in zip(last, chunks, strict=True) if c.samples]
        return HostStep(layout, token_ids, positions, slots, sample_rows)

    def _multimodal_rows(
        self, c: ScheduledChunk, q: int, embeds: torch.Tensor, positions: torch.Tensor,
        deep_rows: list[torch.Tensor], deep_feats: list[torch.Tensor],
    ) -> None:  # fmt: skip
        """M-RoPE positions and encoder features of a prefill chunk's prompt rows, on the device;
        the chunk's DeepStack rows (if its model has them) are appended to `deep_rows`/`deep_feats`."""
        inputs = _inputs(c)
        end = c.start + c.num_tokens
        if inputs.positions is not None:
            # prompt tokens take their M-RoPE positions; tokens past the prompt (a recomputed output)
            # continue at index + rope_delta
            in_prompt = max(0, min(end, c.seq.num_prompt_tokens) - c.start)
            positions[:, q : q + in_prompt] = inputs.positions[:, c.start : c.start + in_prompt]
            if in_prompt < c.num_tokens:
                positions[:, q + in_prompt : q + c.num_tokens] += inputs.rope_delta
        if inputs.mm_embeds is not None:
            idx = inputs.mm_token_indices
            lo, hi = bisect.bisect_left(idx, c.start), bisect.bisect_left(idx, end)
            if hi > lo:
                at = torch.tensor(idx[lo:hi], device=self.device) - c.start + q
                embeds[at] = inputs.mm_embeds[lo:hi].to(embeds.dtype)
                if inputs.deepstack is not None:
                    deep_rows.append(at)
                    deep_feats.append(inputs.deepstack[lo:hi])


def _inputs(chunk: ScheduledChunk) -> ModelInputs:
    return chunk.seq.model_inputs or _NO_INPUTS
