"""A GPU's identity as text that every process agrees on (device numbering does not: each process's
CUDA_VISIBLE_DEVICES renumbers the GPUs it sees)."""

from __future__ import annotations

from typing import Any
from uuid import UUID


def uuid_text(uuid: Any) -> str:
    """The GPU's uuid as text, from its 16 bytes where torch exposes them (the same in every process,
    unlike the repr of an object without its own text form)."""
    raw = getattr(uuid, "bytes", None)
    if raw is not None:
        return str(UUID(bytes=bytes(raw)))
    return "" if uuid is None else str(uuid)
