"""What one scheduler step hands the model runner, and what it hands back per sequence.

Kept apart from `scheduler.py` (which re-exports them) so the runner, the memory profiler and a
prefill stage's KV sender depend on the shape of a step, not on how it is chosen. Plain ints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # index of the first token computed in this step
    num_tokens: int

    @property
    def is_decode(self) -> bool:
        """One token past the prompt; a recomputed output is several, and computed like a prompt."""
        return self.num_tokens == 1 and self.start >= self.seq.num_prompt_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a next token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # ended with FinishReason.ERROR this step

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
