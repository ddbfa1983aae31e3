"""Continuous batching with a token budget, on plain ints.

Each step the scheduler picks, under a budget of `max_num_batched_tokens` tokens and `max_num_seqs`
sequences:
  1. the running sequences, oldest first: one token each when decoding, the next prompt chunk when
     still prefilling (chunked prefill). When the pool has no block for one of them, the newest running
     sequence is swapped out (KV to host memory, blocks freed) until it fits: never a crash, and no
     work is thrown away;
  2. swapped sequences, oldest first, if nothing had to be swapped out this step;
  3. waiting sequences, oldest first, while the budget, the sequence cap and the free blocks allow.
Decodes come first in the step so the model runner can attend over them in one batched call.

The torch side copies KV in and out through the `KVSwapper` it hands in; the scheduler only decides.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from services.engine.block_manager import BlockManager
from services.engine.sequence import FinishReason, Sequence, SequenceStatus


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


class KVSwapper(Protocol):
    def swap_out(self, seq: Sequence) -> None:
        """Copy the KV of `seq`'s computed tokens to host memory (`seq.swapped_kv`)."""

    def swap_in(self, seq: Sequence) -> None:
        """Write `seq.swapped_kv` into the slots of `seq.block_table`, then drop the host copy."""


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # index of the first token computed in this step
    num_tokens: int

    @property
    def is_decode(self) -> bool:
        return self.start >= self.seq.num_prompt_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a next token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass(slots=True)
class SequenceUpdate:
    seq: Sequence
    new_token: int | None  # None when the chunk was a prefill chunk that sampled nothing
    finished: bool


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        swapper: KVSwapper,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        watermark_blocks: int = 0,
    ) -> None:
        self.bm = block_manager
        self.swapper = swapper
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.watermark_blocks = watermark_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # kept oldest first
        self.requests: dict[str, Sequence] = {}
        self.num_swap_outs = 0

    # ---- admission -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence: WAITING for a prompt to compute, SWAPPED when it brings its KV along."""
        if seq.request_id in self.requests:
            raise ValueError(f"request {seq.request_id} is already in the engine")
        limit = self.max_model_len
        if seq.num_tokens >= limit:
            raise ValueError(
                f"request {seq.request_id}: {seq.num_tokens} prompt tokens leave no room for output "
                f"within the context of {limit} tokens"
            )
        self.requests[seq.request_id] = seq
        if seq.status is SequenceStatus.SWAPPED:
            bisect.insort(self.swapped, seq, key=_by_arrival)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        swapped_out = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._swap_out(victim)
                swapped_out = True
                if victim is seq:
                    break
            else:
                chunks.append(self._take(seq, n))
                budget -= n
                i += 1

        while not swapped_out and self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._fits(seq, seq.num_computed_tokens + n):
                break
            self.swapped.pop(0)
            self.bm.grow(seq, seq.num_computed_tokens)
            self.swapper.swap_in(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._take(seq, n))
            budget -= n

        while not swapped_out and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._fits(seq, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._take(seq, n))
            budget -= n

        chunks.sort(key=lambda c: not c.is_decode)  # decodes first, stable otherwise
        return SchedulerOutput(chunks)

    def postprocess(self, output: SchedulerOutput, sampled: list[int]) -> list[SequenceUpdate]:
        """Advance every scheduled sequence; `sampled` has one token per chunk that `samples`."""
        tokens = iter(sampled)
        updates = []
        for chunk in output.chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            if not chunk.samples:
                updates.append(SequenceUpdate(seq, None, False))
                continue
            token = next(tokens)
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
            elif seq.prefill_only:
                self.running.remove(seq)
                seq.status = SequenceStatus.PREFILLED
            updates.append(SequenceUpdate(seq, token, reason is not None))
        return updates

    # ---- ending ----------------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` wherever it is and free its blocks."""
        if seq.status is SequenceStatus.FINISHED:
            return
        queue = {
            SequenceStatus.WAITING: self.waiting,
            SequenceStatus.RUNNING: self.running,
            SequenceStatus.SWAPPED: self.swapped,
        }.get(seq.status)
        if queue is not None:
            queue.remove(seq)
        self.bm.free(seq)
        seq.swapped_kv = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.requests.pop(seq.request_id, None)

    def release(self, seq: Sequence) -> None:
        """Let go of a PREFILLED sequence whose KV has been handed over."""
        self.bm.free(seq)
        self.requests.pop(seq.request_id, None)

    def abort(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self.finish(seq, FinishReason.ABORT)
        return True

    # ---- helpers ---------------------------------------------------------------------------------

    def _take(self, seq: Sequence, n: int) -> ScheduledChunk:
        self.bm.grow(seq, seq.num_computed_tokens + n)
        return ScheduledChunk(seq, seq.num_computed_tokens, n)

    def _fits(self, seq: Sequence, num_tokens: int) -> bool:
        needed = self.bm.blocks_to_grow(seq, num_tokens)
        return needed + self.watermark_blocks <= self.bm.num_free_blocks

    def _swap_out(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.swapper.swap_out(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.SWAPPED
        bisect.insort(self.swapped, seq, key=_by_arrival)
        self.num_swap_outs += 1

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
