"""CUDA graphs of decode-only steps: one captured forward per bucket of padded rows.

A decode step of a large model on a GPU is hundreds of small kernels whose launch costs more than their
work at small batches. Capturing the forward once per bucket (16, 32, 64, ... rows, the attention
backend's own padding buckets) and replaying it removes that: every input lives in a buffer allocated
once (token ids, positions, slots here; the block mask tables in the backend), a step copies its host
inputs into those buffers with pinned, non-blocking copies, and `replay()` runs the whole forward.
Sampling stays outside the graph (it is one small batched call).

Capture can fail on a model whose code synchronises with the host; the engine then logs it and runs
those steps eagerly. With `capture=False` the same buffers are used without a graph (CPU tests check the
buffer handling against the eager path that way).
"""

from __future__ import annotations

from typing import Any

import torch

from common.log import get_logger
from services.engine.attention import AttentionBackend, AttentionMetadata, StepLayout
from services.engine.host_step import HostStep
from services.engine.kv_cache import KVCache

log = get_logger("epd.engine.graphs")


class DecodeGraphs:
    def __init__(
        self, family: Any, kv: KVCache, backend: AttentionBackend, max_num_seqs: int, capture: bool = True
    ) -> None:
        self.family = family
        self.kv = kv
        self.backend = backend
        self.capture = capture and kv.device.type == "cuda"
        self.buckets = sorted({backend.padded_rows(b, 0)[0] for b in range(1, max_num_seqs + 1)})
        top = self.buckets[-1]
        dev = kv.device
        self.token_ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, top, dtype=torch.long, device=dev)
        self.slots = torch.full((top,), kv.scratch_slot, dtype=torch.long, device=dev)
        pin = dev.type == "cuda"
        self._staging = torch.zeros(5, top, dtype=torch.long, pin_memory=pin)  # ids, 3 positions, slots
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self.failed = False
        self.steps = 0  # decode steps that went through the buffers (replayed, or run without capture)

    def covers(self, layout: StepLayout) -> bool:
        """A decode-only step whose padded size has a bucket (larger steps run eagerly)."""
        return (
            not self.failed
            and layout.num_decodes == layout.num_chunks
            and layout.padded_tokens == layout.decode_rows
            and layout.decode_rows in self.buckets
        )

    def run(self, host: HostStep) -> torch.Tensor:
        """Hidden states [padded rows, hidden] of a decode-only step."""
        t = host.layout.padded_tokens
        self.steps += 1
        staging = self._staging[:, :t]
        staging[0].copy_(host.token_ids)
        staging[1:4].copy_(host.positions)
        staging[4].copy_(host.slots)
        self.token_ids[:t].copy_(staging[0], non_blocking=True)
        self.positions[:, :t].copy_(staging[1:4], non_blocking=True)
        self.slots[:t].copy_(staging[4], non_blocking=True)
        state = self.backend.prepare(host.layout)
        if not self.capture:
            return self._forward(t, state)
        entry = self._graphs.get(t)
        if entry is None:
            entry = self._capture(t, state)
            if entry is None:
                return self._forward(t, state)
        graph, hidden = entry
        graph.replay()
        return hidden

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (they share one memory pool), at start-up."""
        if not self.capture:
            return
        for t in reversed(self.buckets):
            if self.failed:
                return
            layout = padding_only(t)
            self.positions[:, :t].zero_()
            self.slots[:t].fill_(self.kv.scratch_slot)
            self._capture(t, self.backend.prepare(layout))

    def _forward(self, t: int, state: Any) -> torch.Tensor:
        meta = AttentionMetadata(self.kv, self.slots[:t], self.backend, state)
        embeds = self.family.embed(self.token_ids[:t])
        return self.family.forward(embeds, self.positions[:, :t], meta)

    def _capture(self, t: int, state: Any) -> tuple[Any, torch.Tensor] | None:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile kernels, settle allocations outside the graph
                    self._forward(t, state)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                hidden = self._forward(t, state)
        except Exception as exc:  # a model that cannot be captured still runs, eagerly
            log.warning("decode CUDA graph capture failed; decode runs eagerly", rows=t, error=str(exc))
            self.failed = True
            return None
        self._graphs[t] = (graph, hidden)
        log.info("captured decode CUDA graph", rows=t)
        return graph, hidden


def padding_only(t: int) -> StepLayout:
    """A layout of `t` padding rows: what a graph is captured with (no sequence is touched)."""
    return StepLayout(
        num_tokens=0, padded_tokens=t, num_decodes=0, decode_rows=t, chunk_starts=[], chunk_lens=[],
        block_table=torch.zeros(0, 1, dtype=torch.long),
        token_chunk=torch.full((t,), -1, dtype=torch.long), token_pos=torch.zeros(t, dtype=torch.long),
    )  # fmt: skip
