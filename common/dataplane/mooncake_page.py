"""The mooncake consumer's control page: which buffers a producer may write, and which transfers it aborted.

Mooncake writes are one-sided: the producer needs the consumer's buffer addresses, and bytes land
without the consumer's process touching them. A descriptor is a snapshot taken when it was published
(at REGISTER, say), while buffers come and go later (prefill allocates a feature buffer per oversized
request), so addresses do not travel in the descriptor. Instead every consumer keeps one small page in
registered memory, and the descriptor names its address; a producer reads it with one Mooncake read
before a write and before every further chunk of it:

- the directory: one slot per live buffer (id hash, address, size, generation, checksum). A slot is
  written word by word while a producer may be reading it, so the checksum makes a torn copy show; the
  producer then reads again. The generation changes on every allocate, so a notice for bytes written
  into a buffer that was freed and allocated again under the same id is recognised and refused;
- the abort board: a ring of the hashes of the last transfers the consumer aborted. A producer that
  finds its transfer there stops, so at most one chunk of an aborted transfer still lands (as in shm).

All words are little-endian uint64; the page is plain numbers, never pickled objects.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np

DIRECTORY_SLOTS = 512
BOARD_SLOTS = 1024
_HEADER_WORDS = 4  # magic, abort cursor, two spare
_SLOT_WORDS = 5  # id hash, address, nbytes, generation, checksum
_MAGIC = int.from_bytes(b"EPDMC001", "little")
_BOARD_START = _HEADER_WORDS + DIRECTORY_SLOTS * _SLOT_WORDS
PAGE_WORDS = _BOARD_START + BOARD_SLOTS
PAGE_BYTES = PAGE_WORDS * 8


def key_hash(key: str) -> int:
    """A non-zero 64-bit hash of a buffer or transfer id (zero marks an empty slot)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") | 1


def _checksum(words: tuple[int, int, int, int]) -> int:
    data = b"".join(w.to_bytes(8, "little") for w in words)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class BufferEntry:
    """Where a consumer buffer lives, as the producer sees it in the page."""

    address: int
    nbytes: int
    generation: int


class ControlPage:
    """The consumer's page (it owns `words`, which the plane registers with the engine)."""

    def __init__(self) -> None:
        self.words = np.zeros(PAGE_WORDS, dtype=np.uint64)
        self.words[0] = _MAGIC
        self._slots = self.words[_HEADER_WORDS:_BOARD_START].reshape(DIRECTORY_SLOTS, _SLOT_WORDS)
        self._board = self.words[_BOARD_START:]
        self._by_id: dict[str, int] = {}
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> int:
        return int(self.words.ctypes.data)

    def publish(self, buffer_id: str, address: int, nbytes: int) -> int:
        """List a buffer for producers; returns its generation."""
        with self._lock:
            if buffer_id in self._by_id:
                raise ValueError(f"buffer {buffer_id!r} is already registered; free() it first")
            free = np.flatnonzero(self._slots[:, 0] == 0)
            if not free.size:
                raise RuntimeError(f"a mooncake plane lists at most {DIRECTORY_SLOTS} buffers at once")
            self._generation += 1
            fields = (key_hash(buffer_id), address, nbytes, self._generation)
            slot = int(free[0])
            self._slots[slot, 0] = 0  # stays empty until the checksum matches the new fields
            self._slots[slot, 1:4] = fields[1:]
            self._slots[slot, 4] = _checksum(fields)
            self._slots[slot, 0] = fields[0]
            self._by_id[buffer_id] = slot
            return self._generation

    def withdraw(self, buffer_id: str) -> None:
        """Unlist a buffer: producers reading the page from now on no longer find it."""
        with self._lock:
            slot = self._by_id.pop(buffer_id, None)
            if slot is not None:
                self._slots[slot] = 0

    def post_abort(self, transfer_id: str) -> None:
        with self._lock:
            cursor = int(self.words[1])
            self._board[cursor % BOARD_SLOTS] = key_hash(transfer_id)
            self.words[1] = cursor + 1


class PageSnapshot:
    """A producer's copy of a consumer's page, read in one Mooncake transfer."""

    def __init__(self, words: np.ndarray) -> None:
        if words.size != PAGE_WORDS or int(words[0]) != _MAGIC:
            raise ValueError("the peer's control page is not a mooncake data-plane page")
        self._slots = words[_HEADER_WORDS:_BOARD_START].reshape(DIRECTORY_SLOTS, _SLOT_WORDS)
        self._board = words[_BOARD_START:]

    def torn(self) -> bool:
        """Whether any listed slot was caught half-written (read the page again)."""
        for slot in self._slots[self._slots[:, 0] != 0]:
            fields = tuple(int(w) for w in slot[:4])
            if _checksum(fields) != int(slot[4]):  # type: ignore[arg-type]
                return True
        return False

    def lookup(self, buffer_id: str) -> BufferEntry | None:
        rows = self._slots[self._slots[:, 0] == np.uint64(key_hash(buffer_id))]
        if not rows.size:
            return None
        return BufferEntry(int(rows[0, 1]), int(rows[0, 2]), int(rows[0, 3]))

    def aborted(self, transfer_id: str) -> bool:
        return bool((self._board == np.uint64(key_hash(transfer_id))).any())
