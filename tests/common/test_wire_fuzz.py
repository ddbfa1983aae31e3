"""Property-based fuzzing of every wire decoder: whatever bytes arrive (random msgpack values of any
shape, valid messages with fields swapped for junk, truncated or garbage frames), the decoder either
returns a typed message or raises its typed refusal, never anything else."""

from __future__ import annotations

import contextlib

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.dataplane import wire as dataplane_wire
from common.dataplane.cudaipc_exports import _decoder as ipc_export_decoder
from common.dataplane.mooncake_link import notice_decoder
from common.dataplane.nixl_grants import ask_decoder, done_decoder, reply_decoder
from common.dataplane.shm import spans_decoder
from common.protocol import MSG_TYPES, Heartbeat, InstanceInfo, Load, Prefill, Register
from common.sampling_params import SamplingParams
from common.wire import ProtocolError, decode_frames, encode_frames

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-encodable values: integers within what msgpack carries, floats with NaN and inf
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=30,
)
_encode = msgspec.msgpack.Encoder().encode


def _valid_bodies() -> list[bytes]:
    info = InstanceInfo(instance_id="d0", roles="D", address="tcp://127.0.0.1:9", model="m")
    prefill = Prefill(
        request_id="r", token_ids=[1, 2, 3], params=SamplingParams(), decode_address="tcp://x:1"
    )  # fmt: skip
    return [encode_frames(m)[1] for m in (Register(info=info), Heartbeat(load=Load()), prefill)]


@FUZZ
@given(code=st.sampled_from(sorted(MSG_TYPES)), body=values)
def test_any_msgpack_body_for_any_message_type_is_a_message_or_a_protocol_error(code, body):
    try:
        msg, _ = decode_frames([bytes((code,)), _encode(body)])
    except ProtocolError:
        return
    assert isinstance(msg, MSG_TYPES[code])


@FUZZ
@given(frames=st.lists(st.binary(max_size=64), max_size=4))
def test_garbage_frames_are_a_protocol_error(frames):
    with contextlib.suppress(ProtocolError):
        decode_frames(frames)


@FUZZ
@given(which=st.integers(0, 2), cut=st.integers(0, 400), junk=st.binary(max_size=8))
def test_valid_messages_cut_short_or_spliced_are_a_protocol_error_or_intact(which, cut, junk):
    body = _valid_bodies()[which]
    mangled = body[:cut] + junk
    code = {0: 1, 1: 3, 2: 20}[which]
    try:
        msg, _ = decode_frames([bytes((code,)), mangled])
    except ProtocolError:
        return
    assert isinstance(msg, MSG_TYPES[code])


@FUZZ
@given(field=st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids"]),
       value=values)  # fmt: skip
def test_sampling_params_from_the_wire_are_checked_like_the_gateways(field, value):
    body = {"request_id": "r", "token_ids": [1], "decode_address": "", "params": {field: value}}
    try:
        msg, _ = decode_frames([bytes((20,)), _encode(body)])
    except ProtocolError:
        return
    params = msg.params
    assert 1 <= params.max_tokens <= 2**31 - 1 and params.temperature >= 0 and 0 < params.top_p <= 1
    assert params.seed is None or -(2**63) <= params.seed < 2**63


DATA_PLANE_DECODERS = {
    "header": (dataplane_wire.decode, ValueError),
    "spans": (spans_decoder.decode, msgspec.DecodeError),
    "nixl ask": (ask_decoder.decode, msgspec.DecodeError),
    "nixl reply": (reply_decoder.decode, msgspec.DecodeError),
    "nixl done": (done_decoder.decode, msgspec.DecodeError),
    "mooncake notice": (notice_decoder.decode, msgspec.DecodeError),
    "cudaipc export": (ipc_export_decoder.decode, msgspec.DecodeError),
}


@FUZZ
@given(name=st.sampled_from(sorted(DATA_PLANE_DECODERS)), body=values | st.binary(max_size=64))
def test_data_plane_decoders_refuse_junk_with_their_decode_error(name, body):
    decode, refusal = DATA_PLANE_DECODERS[name]
    raw = body if isinstance(body, bytes) else _encode(body)
    with contextlib.suppress(refusal):
        decode(raw)
