"""Content keys of full KV blocks, for prefix caching.

A block's keys and values depend on every token before and in it, and on what those tokens stand for:
the placeholder tokens of an image or a video are the same ids for every picture, so the item's
content hash (which also names its preprocessing) is part of the key, and M-RoPE positions follow
from the same prefix. So block `i`'s key is a hash of block `i - 1`'s key, its token ids, and the
content hashes of the multimodal items whose placeholders start in it (a later block of an item
inherits the item through the chain). Equal keys mean equal KV; sampling parameters do not enter.

blake2b with 16-byte digests: a collision would serve another prompt's KV without any error, so the
key is a cryptographic hash, not Python's `hash`. Torch-free.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left

BlockKey = bytes
_ROOT = b"epd-prefix-v1"


def block_keys(
    token_ids: list[int],
    block_size: int,
    mm_starts: list[tuple[int, str]],
    known: list[BlockKey],
    num_blocks: int,
) -> list[BlockKey]:
    """The keys of the first `num_blocks` full blocks of `token_ids`, extending `known` (the keys
    computed before, which are kept). `mm_starts`: (index of an item's first placeholder, its content
    hash), sorted by index."""
    keys = list(known)
    starts = [s for s, _ in mm_starts]
    parent = keys[-1] if keys else _ROOT
    for i in range(len(keys), num_blocks):
        lo, hi = i * block_size, (i + 1) * block_size
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[lo:hi]).tobytes())
        for k in range(bisect_left(starts, lo), bisect_left(starts, hi)):
            h.update(b"\0mm:" + mm_starts[k][1].encode())
        parent = h.digest()
        keys.append(parent)
    return keys


def mm_starts(mm_token_indices: list[int], items: list[tuple[str, int]]) -> list[tuple[int, str]]:
    """Where each multimodal item's placeholders start: `items` are (content hash, placeholder count)
    in prompt order, `mm_token_indices` every placeholder's index in the prompt, in order."""
    starts, at = [], 0
    for hash_, count in items:
        if count < 1 or at + count > len(mm_token_indices):
            raise ValueError(f"item {hash_[:12]}: {count} placeholders do not match the prompt's")
        starts.append((mm_token_indices[at], hash_))
        at += count
    return starts
