"""Framing of the data plane's ZeroMQ channel (producer PUSH -> consumer PULL).

Frame 0 is a msgpack `Header`; tcp "data" messages carry the chunk's bytes as frame 1. Other kinds are
notifications for backends whose bytes travel another way:

- data:  frame 1 holds bytes [chunk_offset, chunk_offset + chunk_length) of the region (tcp);
- done:  the producer has written the whole region in place (shm);
- send:  the producer is about to send that chunk over the pair's process group (torchdist);
- hello: a producer opens a process group with this consumer, named by `sender` (torchdist);
- cancel: the producer gave up on the transfer; `reason` says why.

The region (buffer_id, offset, length) is always the whole destination, so the consumer can reject a
region outside its buffer before any chunk of it lands.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from common.dataplane.base import Region

Kind = Literal["data", "done", "send", "hello", "cancel"]


class Header(msgspec.Struct, array_like=True):
    transfer_id: str
    buffer_id: str
    offset: int
    length: int
    kind: Kind
    chunk_offset: int = 0
    chunk_length: int = 0
    sender: str = ""
    reason: str = ""
    started: float = 0.0  # shm: when the producer began the region (CLOCK_MONOTONIC, same host)

    @property
    def region(self) -> Region:
        return Region(self.buffer_id, self.offset, self.length)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


def encode(header: Header) -> bytes:
    return _encoder.encode(header)


def decode(frame: bytes | memoryview) -> Header:
    """Raises msgspec.DecodeError (a ValueError) on anything that is not a valid header."""
    return _decoder.decode(frame)
