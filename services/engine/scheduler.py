"""Continuous batching with a token budget, on plain ints.

Each step the scheduler picks, under a budget of `max_num_batched_tokens` tokens and `max_num_seqs`
sequences:
  1. the running sequences, oldest arrival first (`running` is kept in arrival order): one token each
     when decoding, the next prompt chunk when still prefilling (chunked prefill). When the pool has
     no block for one of them, the running sequence that arrived last is preempted until it fits:
     swapped out to host memory while the swap space has room, recomputed later when it has not,
     failed with `FinishReason.ERROR` when it can be neither (`preemption.py`). Never a crash;
  2. if nothing had to be preempted this step: swapped sequences (oldest first); then, only once no
     sequence is left swapped out, sequences whose KV arrived from a remote prefill (in order of
     arrival) and waiting ones (oldest first, recomputing ones at their place by arrival). Each queue
     is admitted from its head while the budget, the sequence cap and the free blocks allow. A
     swapped sequence that does not fit yet holds back all newer work: nothing takes the blocks it
     is waiting for, so it is never starved by a stream of new prompts.
Decodes come first in the step so the model runner can attend over them in one batched call.

A decode engine also holds reservations: blocks set aside (`reserve`) for a prompt that a remote
prefill computes and a data plane writes straight into them; `arrive` then queues the sequence to
join the batch, its KV already in place. Every admission (a reservation, a swap-in, a new or arrived
sequence) passes the one watermark check, `_fits`.

The torch side copies KV in and out through the `KVSwapper` it hands in; the scheduler only decides.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from typing import Any

from services.engine.block_manager import BlockManager
from services.engine.preemption import KVSwapper, Preemption, choose
from services.engine.scheduler_output import ScheduledChunk, SchedulerOutput, SequenceUpdate
from services.engine.sequence import FinishReason, Sequence, SequenceStatus


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


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
        num_swap_blocks: int | None = None,  # host blocks swapped-out KV may take; None: no cap
    ) -> None:
        self.bm = block_manager
        self.swapper = swapper
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.watermark_blocks = watermark_blocks
        self.num_swap_blocks = num_swap_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept in arrival order: the last one is the next victim
        self.swapped: list[Sequence] = []  # kept oldest first
        self.reserved: dict[str, Sequence] = {}  # REMOTE, KV still arriving into their blocks
        self.arrived: deque[Sequence] = deque()  # REMOTE, KV in place, waiting to run
        self.requests: dict[str, Sequence] = {}
        self.num_swap_outs = 0
        self.num_recomputes = 0

    # ---- admission -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence: WAITING, its prompt to be computed here."""
        self._check_new(seq)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def reserve(self, seq: Sequence) -> bool:
        """Set aside blocks for the prompt of `seq`, computed by a remote prefill whose data plane
        writes the KV into `seq.block_table`. False, holding nothing, when the pool has no room now
        or swapped-out sequences wait for the blocks it would take."""
        self._check_new(seq)
        seq.cacheable = False  # its KV is written by a data plane; its tokens here are stand-ins
        if self.swapped or not self._fits(seq, seq.num_prompt_tokens):
            return False
        self.bm.grow(seq, seq.num_prompt_tokens)
        seq.status = SequenceStatus.REMOTE
        seq.recomputable = False  # its prompt's inputs (image features) stay with the prefill
        self.requests[seq.request_id] = seq
        self.reserved[seq.request_id] = seq
        return True

    def arrive(
        self, request_id: str, token_ids: list[int], model_inputs: Any = None, prompt_len: int = 0
    ) -> Sequence:
        """The reserved blocks of `request_id` now hold its prompt's KV: queue it to decode on from
        `token_ids` (the prompt and what the prefill sampled after it, usually the first token).
        `prompt_len`: a sequence handed over by another decode engine, whose reserved "prompt" is
        every token but the last; its own prompt length keeps its output count (0: the reserved)."""
        seq = self.reserved.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id} has no reservation")
        n = seq.num_prompt_tokens
        if not n < len(token_ids) < self.max_model_len:
            raise ValueError(
                f"request {request_id}: {len(token_ids)} tokens for a prompt of {n}; expected the "
                f"prompt and at least one sampled token, under the context of {self.max_model_len}"
            )
        del self.reserved[request_id]
        seq.token_ids = list(token_ids)
        seq.model_inputs = model_inputs
        seq.num_computed_tokens = n
        seq.num_prompt_tokens = prompt_len if 0 < prompt_len <= n else n
        self.arrived.append(seq)
        return seq

    def detach(self, request_id: str) -> Sequence | None:
        """Take a decoding sequence (running, or arrived and not yet run) out of the batch between
        steps, its blocks kept, for its KV to move to another engine (PREFILLED: `release` frees it);
        None when it is not in one of those states (swapped out, its KV still arriving, ended)."""
        seq = self.requests.get(request_id)
        if seq is None or seq.num_computed_tokens != seq.num_tokens - 1:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.REMOTE and seq in self.arrived:
            self.arrived.remove(seq)
        else:
            return None
        seq.status = SequenceStatus.PREFILLED
        return seq

    def has_unfinished(self) -> bool:
        """Whether a step has work; reservations wait on a data plane, not on a step."""
        return bool(self.waiting or self.running or self.swapped or self.arrived)

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput()
        chunks = out.chunks
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]  # the newest arrival, never one before `seq`
                self._preempt(victim, out.failed)
                preempted = True
                if victim is seq:
                    break
            else:
                chunks.append(self._take(seq, n))
                budget -= n
                i += 1

        if not preempted:
            budget = self._admit(self.swapped, budget, chunks)
            if not self.swapped:  # swapped sequences first: newer work waits behind them
                for queue in (self.arrived, self.waiting):
                    budget = self._admit(queue, budget, chunks)

        chunks.sort(key=lambda c: not c.is_decode)  # decodes first, stable otherwise
        return out

    def postprocess(self, output: SchedulerOutput, sampled: list[int]) -> list[SequenceUpdate]:
        """Advance every scheduled sequence; `sampled` has one token per chunk that `samples`."""
        tokens = iter(sampled)
        updates = []
        for chunk in output.chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            self.bm.cache_blocks(seq)
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
        elif seq.status is SequenceStatus.REMOTE and self.reserved.pop(seq.request_id, None) is None:
            self.arrived.remove(seq)
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

    def _check_new(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request {seq.request_id} is already in the engine")
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(
                f"request {seq.request_id}: {seq.num_tokens} prompt tokens leave no room for output "
                f"within the context of {self.max_model_len} tokens"
            )

    def _fits(self, seq: Sequence, num_tokens: int) -> bool:
        """The one admission check: `seq` may grow to `num_tokens` tokens if that leaves
        `watermark_blocks` free for the running sequences to grow into (so admitting work does not
        force a swap at once). With no other sequence holding blocks there is nobody to protect, and
        `seq` may take the whole pool: a lone sequence of `max_model_len` tokens always fits."""
        bm = self.bm
        needed = bm.blocks_to_grow(seq, num_tokens)
        alone = bm.num_free_blocks + len(seq.block_table) == bm.num_blocks
        return needed + (0 if alone else self.watermark_blocks) <= bm.num_free_blocks

    def _admit(
        self, queue: list[Sequence] | deque[Sequence], budget: int, chunks: list[ScheduledChunk]
    ) -> int:
        """Start sequences from the head of `queue` while the budget, the sequence cap and the pool
        allow; returns the budget left."""
        while queue and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = queue[0]
            cached = self._attach_cached_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._fits(seq, seq.num_computed_tokens + n):
                if cached:  # it waits holding nothing, as it came
                    self.bm.free(seq)
                    seq.num_computed_tokens = 0
                break
            del queue[0]
            if seq.status is SequenceStatus.WAITING and not seq.num_output_tokens:
                self.bm.query_tokens += seq.num_prompt_tokens
                self.bm.hit_tokens += seq.num_computed_tokens
            if seq.status is SequenceStatus.SWAPPED:
                self.bm.grow(seq, seq.num_computed_tokens)
                self.swapper.swap_in(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_by_arrival)
            chunks.append(self._take(seq, n))
            budget -= n
        return budget

    def _attach_cached_prefix(self, seq: Sequence) -> bool:
        """Start a prompt about to be computed from scratch at the end of its longest cached prefix."""
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            return False
        blocks = self.bm.cached_prefix(seq)
        if not blocks:
            return False
        self.bm.attach(seq, blocks)
        seq.num_computed_tokens = len(blocks) * self.bm.block_size
        if not seq.num_output_tokens:  # what the response reports: its first admission's hit
            seq.num_cached_tokens = seq.num_computed_tokens
        return True

    @property
    def num_swapped_blocks(self) -> int:
        """Host blocks the swapped-out KV takes (what `num_swap_blocks` caps)."""
        return sum(self.bm.blocks_for(s.num_computed_tokens) for s in self.swapped)

    def _preempt(self, seq: Sequence, failed: list[Sequence]) -> None:
        """Take the blocks of running `seq` back: swap, recompute or fail (`preemption.py`)."""
        cap = self.num_swap_blocks
        left = None if cap is None else cap - self.num_swapped_blocks
        how = choose(seq, self.bm.blocks_for(seq.num_computed_tokens), left)
        if how is Preemption.SWAP:
            self.running.remove(seq)
            self.swapper.swap_out(seq)
            self.bm.free(seq)
            seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, seq, key=_by_arrival)
            self.num_swap_outs += 1
        elif how is Preemption.RECOMPUTE:
            self.running.remove(seq)
            self.bm.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            bisect.insort(self.waiting, seq, key=_by_arrival)
            self.num_recomputes += 1
        else:
            self.finish(seq, FinishReason.ERROR)
            failed.append(seq)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
