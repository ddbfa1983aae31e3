"""A least-recently-used map with a byte budget and pins: the embedding caches of encode and prefill.

A pinned entry (a request is waiting on it) is never evicted; the budget may then be exceeded until
it is unpinned, which is better than failing the request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, capacity_bytes: int, on_evict: Callable[[str, V], None] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.on_evict = on_evict
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._pins: dict[str, int] = {}
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: V, nbytes: int) -> None:
        if key in self._items:
            self.bytes_used -= self._items.pop(key)[1]
        self._items[key] = (value, nbytes)
        self.bytes_used += nbytes
        self._evict()

    def pin(self, key: str) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        n = self._pins.get(key, 0) - 1
        if n > 0:
            self._pins[key] = n
        else:
            self._pins.pop(key, None)
            self._evict()

    def _evict(self) -> None:
        for key in list(self._items):
            if self.bytes_used <= self.capacity_bytes:
                return
            if key in self._pins:
                continue
            value, nbytes = self._items.pop(key)
            self.bytes_used -= nbytes
            if self.on_evict is not None:
                self.on_evict(key, value)
