"""Framing of control messages on ZeroMQ: [type byte, msgpack body, raw buffers...].

`encode_frames` / `decode_frames` are the only way a message becomes bytes and back. Decoding picks
the Struct type from frame 0 and decodes the body strictly against it: an unknown type byte, a body
that does not match its type or a missing frame raises `ProtocolError`, which receivers log and drop
(or answer), never crash on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from common.protocol import MSG_TYPES, TYPE_CODES, Msg

_encoder = msgspec.msgpack.Encoder()
_decoders = {code: msgspec.msgpack.Decoder(cls) for code, cls in MSG_TYPES.items()}


class ProtocolError(ValueError):
    pass


def encode_frames(msg: Msg, buffers: Sequence[Any] = ()) -> list[Any]:
    code = TYPE_CODES.get(type(msg))
    if code is None:
        raise ProtocolError(f"{type(msg).__name__} is not a protocol message")
    return [bytes((code,)), _encoder.encode(msg), *buffers]


def decode_frames(frames: Sequence[Any]) -> tuple[Msg, list[Any]]:
    """Frames (bytes or zmq.Frame) -> (message, raw buffers after the body)."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames, got {len(frames)}")
    head = memoryview(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    if len(head) != 1 or head[0] not in _decoders:
        raise ProtocolError(f"unknown message type {bytes(head[:4])!r}")
    body = frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
    try:
        msg = _decoders[head[0]].decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed {MSG_TYPES[head[0]].__name__}: {exc}") from exc
    return msg, list(frames[2:])
