"""Control-plane framing: typed round trips, and malformed input rejected whole (never a crash)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from common.mailbox import Mailbox
from common.protocol import MSG_TYPES, PROTOCOL_VERSION, Abort, InstanceInfo, Prefill, Register
from common.sampling_params import SamplingParams
from common.wire import ProtocolError, decode_frames, encode_frames
from gateway.registry import Registry


def test_round_trip_keeps_types_and_raw_frames():
    msg = Prefill(request_id="r", token_ids=[1, 2, 3], params=SamplingParams(max_tokens=5, seed=3))
    decoded, raw = decode_frames(encode_frames(msg, [b"\x00\x01"]))
    assert decoded == msg and raw == [b"\x00\x01"]


def test_every_message_type_has_a_unique_code():
    assert len(set(MSG_TYPES.values())) == len(MSG_TYPES)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([b"\x28"], "at least 2 frames"),
        ([b"\xfe", b"\x80"], "unknown message type"),
        ([b"\x28\x28", b"\x80"], "unknown message type"),
        ([b"\x28", b"not msgpack"], "malformed Abort"),
        ([b"\x28", msgspec.msgpack.encode({"request_id": 5})], "malformed Abort"),
        ([b"\x14", msgspec.msgpack.encode({"request_id": "r", "token_ids": [], "params": {"max_tokens": 0}})],
         "malformed Prefill"),
    ],
)  # fmt: skip
def test_malformed_frames_are_rejected_with_a_reason(frames, message):
    with pytest.raises(ProtocolError, match=message):
        decode_frames(frames)


def test_pickle_is_not_a_message():
    with pytest.raises(ProtocolError):
        encode_frames(object())  # type: ignore[arg-type]


def test_mailbox_drops_garbage_and_keeps_receiving():
    async def run():
        ctx = zmq.asyncio.Context()
        box = Mailbox(ctx, "inbox")
        raw = ctx.socket(zmq.DEALER)
        raw.connect(box.address)
        await raw.send_multipart([b"\xff", b"garbage"])
        await raw.send_multipart([b"only one frame"])
        # a good message after the garbage, on the same connection (so it arrives after it)
        await raw.send_multipart(encode_frames(Abort(request_id="after", sender="sender")))
        msg, _ = await asyncio.wait_for(box.recv(), 5)
        raw.close(0)
        box.close()
        ctx.term()
        return msg, box.dropped

    msg, dropped = asyncio.run(run())
    assert msg == Abort(request_id="after", sender="sender") and dropped == 2


def test_registry_refuses_another_protocol_version_or_model():
    reg = Registry("m")
    info = InstanceInfo(instance_id="d0", roles="D", address="tcp://x", model="m")
    assert reg.admit(info) == (None, None)
    old = InstanceInfo(
        instance_id="d1", roles="D", address="tcp://y", model="m", protocol_version=PROTOCOL_VERSION + 1
    )
    assert "protocol version" in reg.admit(old)[0]
    other = InstanceInfo(instance_id="d2", roles="D", address="tcp://z", model="other")
    assert "serves model" in reg.admit(other)[0]
    assert set(reg.instances) == {"d0"}
    assert Register(info=info).info.roles == "D"
