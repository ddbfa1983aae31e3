"""Content hashes of multimodal items: the key of the embedding cache across processes.

The gateway hashes an image's bytes once; encode instances cache features under that hash and prefill
instances are told the hash only when they already hold the features. Every process must therefore
compute the same key for the same bytes, whatever its Python version or platform: hence a fixed
algorithm (BLAKE2b, 16-byte digest) over the raw bytes, never Python's salted `hash()`. 128 bits keep
accidental collisions out of reach for any cache size, and BLAKE2b hashes about 1 GB/s, so hashing a
20 MB image costs a few tens of milliseconds at most.

A video's features depend on how it was sampled and resized too, so its key covers both: the same file
sampled at another fps, or resized to other bounds, is another item (`context_hash`).
"""

from __future__ import annotations

import hashlib

DIGEST_SIZE = 16


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """The hex BLAKE2b-128 digest of `data` (32 lowercase hex characters)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def context_hash(context: bytes, data: bytes | bytearray | memoryview) -> str:
    """The key of `data` as shaped by `context` (a canonical encoding of the preprocessing settings).

    The context is length-prefixed, so no (context, data) pair reads as another, and the BLAKE2b is
    personalised, so these keys live apart from `content_hash` keys (an image of the same bytes).
    """
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"epd-ctx")
    digest.update(len(context).to_bytes(8, "little"))
    digest.update(context)
    digest.update(data)
    return digest.hexdigest()
