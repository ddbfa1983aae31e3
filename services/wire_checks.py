"""Checks of what a stage receives from the wire, made before anything uses it, and their tally.

The wire decoders (common/wire.py) guarantee each message's shape and types; they cannot know this
stage's model and limits: a token id past the vocabulary, a prompt longer than the context, a block
count the pool cannot hold, an id nobody placed here. The stage that receives a message checks those
itself. Each check returns the problem as a sentence that names the field, or None when the message
is fine; the worker fails the message's request with it (400) and counts the refusal, so a broken or
hostile peer costs one request, never the process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

MAX_ID_CHARS = 256  # request ids, content hashes, instance ids, addresses and buffer ids


def vocab_size(family: Any) -> int:
    """Token ids the model can embed: an id at or past this indexes outside the embedding table."""
    config = family.config
    text = getattr(config, "text_config", None) or config
    return int(text.vocab_size)


def id_problem(name: str, value: str) -> str | None:
    if not value:
        return f"{name} is empty"
    if len(value) > MAX_ID_CHARS:
        return f"{name} is longer than {MAX_ID_CHARS} characters"
    return None


def ids_problem(msg: object, *names: str) -> str | None:
    """The first of the message's id fields `names` that is empty or too long, as `id_problem` says."""
    for name in names:
        if (problem := id_problem(name, getattr(msg, name))) is not None:
            return problem
    return None


def token_problem(name: str, token_ids: Sequence[int], vocab: int) -> str | None:
    """Whether every id is one the model knows (0 to vocab - 1)."""
    if not token_ids:
        return f"{name} is empty"
    if min(token_ids) >= 0 and max(token_ids) < vocab:
        return None
    at, bad = next((i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab)
    return f"{name}: token id {bad} at position {at} is outside the vocabulary (0 to {vocab - 1})"


class Refusals:
    """Messages a stage refused, counted by type; each is logged with the running count, so an operator
    sees a broken or hostile peer in the log without a crash to point at it."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.by_type: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_type.values())

    def count(self, msg: Any, problem: str) -> None:
        kind = type(msg).__name__
        self.by_type[kind] += 1
        self.log.warning(
            "refused a message", type=kind, request_id=getattr(msg, "request_id", None),
            sender=getattr(msg, "sender", ""), problem=problem, refused=self.by_type[kind],
        )  # fmt: skip
