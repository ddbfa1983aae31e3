"""Content hashes of multimodal items: the key of the embedding cache across processes.

The gateway hashes an image's bytes once; encode instances cache features under that hash and prefill
instances are told the hash only when they already hold the features. Every process must therefore
compute the same key for the same bytes, whatever its Python version or platform: hence a fixed
algorithm (BLAKE2b, 16-byte digest) over the raw bytes, never Python's salted `hash()`. 128 bits keep
accidental collisions out of reach for any cache size, and BLAKE2b hashes about 1 GB/s, so hashing a
20 MB image costs a few tens of milliseconds at most.
"""

from __future__ import annotations

import hashlib

DIGEST_SIZE = 16


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """The hex BLAKE2b-128 digest of `data` (32 lowercase hex characters)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()
