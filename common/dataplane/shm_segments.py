"""POSIX shared-memory segments for the shm backend: naming, creating, attaching, and the abort board.

A segment's name is derived from the consumer plane's id and the buffer id, so a producer that knows the
descriptor and a Region can find the memory without asking. Each segment starts with a 64-byte header
(magic, live flag); the data follows. free() clears the live flag before unlinking, so a producer holding
an old mapping notices the buffer was freed (and perhaps re-allocated under the same id) and re-attaches.

The abort board is one small segment per consumer listing the hashes of recently aborted transfers;
producers check it before every chunk, so bytes of a transfer the consumer aborted stop landing within
one chunk (in the other backends the consumer itself drops them).

Python before 3.13 registers every attached segment with its resource tracker, which would unlink the
consumer's memory when the producer exits: attachments are unregistered (unless this process created
the segment).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

HEADER_BYTES = 64
MAGIC = np.frombuffer(b"EPDSHM01", dtype=np.uint64)[0]
BOARD_SLOTS = 4096

_created_here: set[str] = set()


def segment_name(plane_id: str, key: str) -> str:
    """A short name (macOS allows 31 characters) unique to one plane and one buffer id."""
    digest = hashlib.blake2b(f"{plane_id}\0{key}".encode(), digest_size=10).hexdigest()
    return f"epd_{digest}"


def create(name: str, nbytes: int) -> SharedMemory:
    """A new segment whose pages are reserved now, so a full /dev/shm fails here, not with SIGBUS later."""
    shm = SharedMemory(name=name, create=True, size=HEADER_BYTES + nbytes)
    _created_here.add(shm.name)
    fd = getattr(shm, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, HEADER_BYTES + nbytes)
        except OSError as exc:
            destroy(shm)
            raise MemoryError(
                f"cannot reserve {nbytes} bytes of shared memory ({exc}); is /dev/shm large enough?"
            ) from exc
    header = np.frombuffer(shm.buf, dtype=np.uint64, count=2)
    header[0], header[1] = MAGIC, 1
    return shm


def mark_freed(shm: SharedMemory) -> None:
    np.frombuffer(shm.buf, dtype=np.uint64, count=2)[1] = 0


def destroy(shm: SharedMemory) -> None:
    """Unlink the name now; the mapping goes once no view of it is left."""
    _created_here.discard(shm.name)
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()
    close(shm)


def close(shm: SharedMemory) -> None:
    """Unmap now, or, while views handed out are still alive, leave the mapping to them.

    The mmap object stays referenced by those views and is unmapped when the last one goes; the
    SharedMemory object forgets it, so its own finaliser does not try (and fail) again.
    """
    try:
        shm.close()
    except BufferError:
        shm._mmap = None  # type: ignore[attr-defined]
        if getattr(shm, "_fd", -1) >= 0:
            os.close(shm._fd)  # type: ignore[attr-defined]
            shm._fd = -1  # type: ignore[attr-defined]


def attach(name: str) -> SharedMemory:
    """Map another process's segment without letting our resource tracker unlink it at exit."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    shm = SharedMemory(name=name)
    if shm.name not in _created_here:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


class Attachment:
    """A producer's mapping of one consumer buffer."""

    def __init__(self, name: str) -> None:
        self.shm = attach(name)
        raw = np.frombuffer(self.shm.buf, dtype=np.uint8)
        self.header = raw[:HEADER_BYTES].view(np.uint64)
        self.data = raw[HEADER_BYTES:]
        if self.header[0] != MAGIC:
            self.close()
            raise ValueError(f"shared memory segment {name} is not a data-plane buffer")

    @property
    def live(self) -> bool:
        return bool(self.header[1] == 1)

    def close(self) -> None:
        del self.header, self.data
        close(self.shm)


def _transfer_hash(transfer_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(transfer_id.encode(), digest_size=8).digest(), "little") | 1


class AbortBoard:
    """A ring of the last BOARD_SLOTS aborted transfer-id hashes; slot 0 is the write cursor."""

    def __init__(self, shm: SharedMemory, owner: bool) -> None:
        self.shm = shm
        self.owner = owner
        self.slots = np.frombuffer(shm.buf, dtype=np.uint64, count=BOARD_SLOTS + 1)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, name: str) -> AbortBoard:
        shm = SharedMemory(name=name, create=True, size=8 * (BOARD_SLOTS + 1))
        _created_here.add(shm.name)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> AbortBoard:
        return cls(attach(name), owner=False)

    def post(self, transfer_id: str) -> None:
        with self._lock:
            cursor = int(self.slots[0])
            self.slots[1 + cursor % BOARD_SLOTS] = _transfer_hash(transfer_id)
            self.slots[0] = cursor + 1

    def posted(self, transfer_id: str) -> bool:
        return bool((self.slots[1:] == _transfer_hash(transfer_id)).any())

    def close(self) -> None:
        del self.slots
        if self.owner:
            destroy(self.shm)
        else:
            close(self.shm)
