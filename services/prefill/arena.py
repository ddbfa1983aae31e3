"""First-fit allocation of byte ranges inside one long-lived buffer, on plain ints.

Prefill receives encoder features into one data-plane buffer allocated at start-up instead of a new
buffer per item: allocating and first-touching a fresh shared-memory segment costs milliseconds on
both sides, a warm arena costs nothing. Ranges live only from the offer until the features are
copied out, so the arena stays mostly empty and first fit never fragments it for long.
"""

from __future__ import annotations

import bisect


class Arena:
    def __init__(self, size: int, align: int = 64) -> None:
        self.size = size
        self.align = align
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, coalesced
        self._used: dict[int, int] = {}

    @property
    def bytes_free(self) -> int:
        return sum(length for _, length in self._free)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of `nbytes` free bytes, or None when no free range is large enough."""
        need = -(-max(nbytes, 1) // self.align) * self.align
        for i, (offset, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, length - need)
                self._used[offset] = need
                return offset
        return None

    def free(self, offset: int) -> None:
        length = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, length))
        self._free.insert(i, (offset, length))
        # coalesce with the neighbours
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            length += self._free.pop(i + 1)[1]
            self._free[i] = (offset, length)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            prev_off, prev_len = self._free.pop(i - 1)
            self._free[i - 1] = (prev_off, prev_len + length)
