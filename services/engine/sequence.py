"""One request inside the engine: its tokens, its KV blocks and where it is in its life.

Torch-free on purpose: the scheduler and block manager reason about sequences with plain ints. What the
model runner needs beyond token ids (image features, M-RoPE positions) rides along in `model_inputs`,
an opaque object the scheduler never looks into.

Life of a sequence: WAITING (prompt not yet computed) -> RUNNING (prefill chunks, then one token per
step) -> FINISHED. Under memory pressure a RUNNING sequence is SWAPPED out (its KV copied to host
memory, its blocks freed) and later swapped back in; when the host swap space is full it goes back to
WAITING instead, its KV dropped, to recompute its prompt and output (`preemption.py`). A prefill-only
engine parks a sequence as PREFILLED after its first token, until its KV has been handed over.

A decode engine meets the other end of that hand-off: a sequence whose prompt a remote prefill
computed is REMOTE from the moment blocks are reserved for it. Its KV first arrives into those blocks
(written in place by a data plane; the sequence knows only its prompt length), then, once every byte
is in and the first token is known, it waits its turn to join the running batch: REMOTE -> RUNNING,
with no copy. It never holds a host copy (that is SWAPPED's business), so neither state stands in for
the other.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

from common.sampling_params import SamplingParams

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    REMOTE = "remote"  # decode engines: prompt computed by a remote prefill, KV into reserved blocks
    PREFILLED = "prefilled"  # prefill-only engines: first token sampled, KV kept until handed over
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"  # the engine could not keep it: preempted with no swap space and no way to recompute


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        model_inputs: Any = None,
        prefill_only: bool = False,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: the prompt is empty")
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.model_inputs = model_inputs
        self.prefill_only = prefill_only
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.swapped_kv: Any = None  # host copy of the KV while SWAPPED
        self.sampling_cache: Any = None  # the sampler's copy of the prompt ids on the device (penalties)
        # False when the prompt's KV came from a remote prefill: nothing here to recompute it from
        self.recomputable = True
        # prefix caching (block_manager.py): whether its blocks may be shared (False for KV written by
        # a data plane, whose tokens are not all known here), where its multimodal items start
        # ((index, content hash), sorted), its blocks' content keys, how many of its blocks are
        # registered in the cache, and how many prompt tokens it found there when first admitted
        self.cacheable = True
        self.mm_starts: list[tuple[int, str]] = []
        self.block_keys: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0
        self.arrival = next(_arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
