"""Incremental detokenization with stop strings, torch-free (the gateway uses it too).

Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is decoded over a small
window of recent tokens and only released once it no longer ends in a replacement character. Text
that could still turn into a stop string is held back until it cannot, so a stream never shows a
stop string, or half of one, that the final text does not contain.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is seen)
        self._emitted = 0  # characters of `text` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> bool:
        """Add new tokens; return True when a stop string has been reached (text is cut before it)."""
        if self.stopped:
            return True
        for tok in token_ids:
            self.token_ids.append(tok)
            prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                delta = full[len(prefix) :]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self.token_ids)
                if self._append(delta):
                    return True
        return False

    def _append(self, delta: str) -> bool:
        start = max(0, len(self.text) - self._hold)
        self.text += delta
        hits = [at for s in self.stop if (at := self.text.find(s, start)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _flush(self) -> None:
        """The generation ended: tokens held back because they end inside a UTF-8 character are text
        now, replacement character included (as `tokenizer.decode` of the whole output shows them)."""
        if self.stopped or self._read_offset >= len(self.token_ids):
            return
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        if len(full) > len(prefix):
            self._append(full[len(prefix) :])

    def new_text(self, final: bool = False) -> str:
        """Text not handed out yet; while not final, keeps back a tail that may start a stop string."""
        if final:
            self._flush()
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
