"""Cache-aware choice of the prefill instance: send a prompt where its prefix was computed last.

Each prefill instance keeps a prefix cache of KV blocks (services/engine/block_manager.py), so a prompt
that shares a long prefix with an earlier one (a system prompt, the same picture) is cheap only on the
instance that computed the earlier one. The gateway cannot see those caches; it remembers instead which
instance it sent each prefix to. A prompt's prefix keys are a hash chain over windows of
`window_tokens` tokens, into which the content hash of every image or video whose placeholders start
in a window is mixed (placeholder ids are the same for every picture). The instance holding the
longest run of a prompt's keys wins, unless it has `balance_slack` more requests in flight than the
least loaded one: then load wins, as in SGLang's cache-aware router. Torch-free; the keys are a
routing hint only (a wrong guess costs a recomputed prefix, never a wrong answer).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def placeholder_starts(token_ids: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Where each item's placeholders start: the next run of one repeated id of exactly its count.
    Items whose run is not found (an unusual template) are left out."""
    starts, i, n = [], 0, len(token_ids)
    for count in counts:
        while i < n:
            j = i
            while j < n and token_ids[j] == token_ids[i]:
                j += 1
            if j - i == count:
                starts.append(i)
                i = j
                break
            i = j
    return starts


class PrefixAffinity:
    def __init__(
        self, window_tokens: int = 128, max_windows: int = 32, capacity: int = 200_000, balance_slack: int = 4
    ) -> None:
        self.window_tokens = window_tokens
        self.max_windows = max_windows
        self.balance_slack = balance_slack
        self._capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # prefix key -> prefill instance id

    def keys(self, token_ids: Sequence[int], items: Sequence[tuple[str, int]]) -> list[bytes]:
        """The prefix keys of a prompt: one per full window, at most `max_windows`. `items`: (content
        hash, placeholder count) of its images and videos in prompt order."""
        w = self.window_tokens
        starts = placeholder_starts(token_ids, [count for _, count in items])
        marks = sorted(zip(starts, (h for h, _ in items), strict=False))
        keys, parent, k = [], b"epd-route", 0
        for i in range(min(len(token_ids) // w, self.max_windows)):
            h = hashlib.blake2b(parent, digest_size=16)
            h.update(array("q", token_ids[i * w : (i + 1) * w]).tobytes())
            while k < len(marks) and marks[k][0] < (i + 1) * w:
                h.update(marks[k][1].encode())
                k += 1
            parent = h.digest()
            keys.append(parent)
        return keys

    def choose(self, keys: list[bytes], candidates: list, load) -> tuple[object, int]:
        """The candidate to use and how many of `keys` it is believed to hold; `load(inst)` orders
        candidates (the least loaded is the fallback)."""
        least = min(candidates, key=load)
        if not keys or len(candidates) == 1:
            return least, 0
        by_id = {c.id: c for c in candidates}
        best = by_id.get(self._owner.get(keys[0], ""))
        if best is None or len(best.inflight) > len(least.inflight) + self.balance_slack:
            return least, 0
        matched = 1
        while matched < len(keys) and self._owner.get(keys[matched]) == best.id:
            matched += 1
        return best, matched

    def remember(self, keys: list[bytes], instance_id: str) -> None:
        for key in keys:
            self._owner[key] = instance_id
            self._owner.move_to_end(key)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)
