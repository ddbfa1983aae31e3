"""Content hashes: one fixed algorithm, so every process computes the same cache key for the same bytes."""

from __future__ import annotations

import subprocess
import sys

from common.hashing import content_hash


def test_hash_is_blake2b_128_hex_with_known_values() -> None:
    # Fixed vectors: a change here would silently invalidate every embedding cache across a cluster.
    assert content_hash(b"abc") == "cf4ab791c62b8d2b2109c90275287816"
    assert content_hash(b"") == "cae66941d9efbd404e4d88758ea67670"


def test_hash_depends_on_every_byte_and_accepts_buffers() -> None:
    data = bytes(range(256)) * 100
    changed = bytearray(data)
    changed[-1] ^= 1
    assert content_hash(data) != content_hash(bytes(changed))
    assert content_hash(memoryview(data)) == content_hash(bytearray(data)) == content_hash(data)


def test_hash_is_the_same_in_another_process() -> None:
    code = "from common.hashing import content_hash; print(content_hash(b'image bytes'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == content_hash(b"image bytes")
