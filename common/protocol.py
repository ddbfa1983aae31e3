"""Every control-plane message, as a typed msgspec Struct (msgpack on the wire).

A message travels as ZeroMQ frames: frame 0 is one byte naming its type (`MSG_TYPES`), frame 1 the
msgpack body, and any further frames are raw buffers (encoded images, small tensors) the body refers
to by index. The receiver picks a typed decoder from frame 0 before it reads the body, so a malformed
or unknown message is rejected whole, never half-applied. Fields added later get defaults; a peer with
another `PROTOCOL_VERSION` is refused at registration. Pickle never crosses a socket.

Who sends what (E encode, P prefill, D decode, G gateway):
  E,P,D -> G  Register, Heartbeat, FirstToken (P), Tokens (D), RequestError
  G -> E      Encode                      E -> P  FeatureOffer      P -> E  FeatureDest
  G -> P      Prefill                     G -> D  KvReserve         D -> P  KvDest
  P -> D      KvReady                     G -> any Abort            G -> E,P,D RegisterAck
  G -> E,P,D  SetRoles                    G -> D  Handoff           E,P,D -> G  Leaving
A decode instance handing a request off to another is its prefill for that request: D -> D KvReserve,
KvDest back, KvReady (docs/protocol.md).
"""

from __future__ import annotations

import msgspec

from common.logprobs import Logprobs
from common.sampling_params import SamplingParams
from common.stage_histograms import PhaseSnapshot

PROTOCOL_VERSION = 1


class Msg(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of every message; `sender` is the instance id (or "gateway") that sent it."""

    sender: str = ""


# ---- membership ---------------------------------------------------------------------------------


class InstanceInfo(msgspec.Struct, kw_only=True):
    instance_id: str
    roles: str  # letters of E, P, D hosted by this process, e.g. "EP"
    address: str  # the process's inbox (a ZeroMQ ROUTER endpoint)
    model: str
    protocol_version: int = PROTOCOL_VERSION
    dataplane: dict = {}  # the data plane's descriptor (backend, endpoint, host identity)
    pid: int = 0
    host: str = ""
    kv_block_size: int = 0
    kv_num_blocks: int = 0  # blocks of the KV pool (D): with the layout, locates every block in it
    kv_block_bytes: int = 0  # bytes of one block of one layer's keys (or values)
    kv_num_layers: int = 0
    max_model_len: int = 0


class Register(Msg):
    info: InstanceInfo


class RegisterAck(Msg):
    accepted: bool
    reason: str = ""
    heartbeat_interval: float = 0.5
    retry: bool = False  # not accepted for now: register again (the gateway lost track of it)


class Load(msgspec.Struct, kw_only=True, omit_defaults=True):
    waiting: int = 0
    running: int = 0
    encode_queue: int = 0
    feature_waiting: int = 0  # of `waiting`: prompts at a prefill role still missing encoder features
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    transfer_bytes: int = 0  # data plane, sent + received, since start
    transfer_seconds: float = 0.0
    # latency histograms of this process's phases since start (common/stage_histograms.py); only the
    # phases observed at least once; the gateway checks them before use
    phases: dict[str, PhaseSnapshot] = {}
    cache_hits: dict[str, int] = {}  # encoder cache, by modality ("image", ...), since start
    cache_misses: dict[str, int] = {}


class Heartbeat(Msg):
    load: Load
    address: str = ""  # the sender's inbox, so a gateway that lost track of it can answer


# ---- encode ---------------------------------------------------------------------------------------


MM_KINDS = ("image", "video", "audio")


class VideoSettings(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How the gateway planned a video's frames (common.video_sampling.VideoSampling, whose defaults
    these are); the encoder samples with exactly these, so its grid is the one the prompt counted.
    The patch geometry is the model's own and does not travel. `num_frames` 0: sample by `fps`."""

    fps: float = 2.0
    num_frames: int = 0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000


class MMItem(msgspec.Struct, kw_only=True):
    hash: str  # the embedding-cache key (common.hashing; for a video, its bytes and its settings)
    frame: int = -1  # index of the raw frame with the encoded media; -1: the encoder holds it already
    kind: str = "image"  # one of MM_KINDS
    video: VideoSettings | None = None  # with kind "video"
    # kind "audio": the duration the gateway cut the decoded clip to (its max_audio_seconds), so the
    # encoder cuts it the same way and makes the token count the prompt was expanded with
    max_seconds: float = 0.0


class Encode(Msg):
    request_id: str
    items: list[MMItem]
    prefill_id: str  # where the features go
    prefill_address: str
    prefill_dataplane: dict = {}


class FeatureOffer(Msg):
    """E -> P: features of `hash` are ready; where should they go?"""

    hash: str
    nbytes: int
    dtype: str
    shape: list[int]
    encoder_address: str


class FeatureDest(Msg):
    """P -> E: write them to `buffer_id` (or nothing: `buffer_id` empty, P already holds them)."""

    hash: str
    buffer_id: str = ""
    transfer_id: str = ""
    offset: int = 0  # where in the buffer (prefill keeps one arena for all features)


# ---- prefill and decode ---------------------------------------------------------------------------


class MMRef(msgspec.Struct, kw_only=True):
    hash: str
    grid_thw: tuple[int, int, int]
    num_tokens: int
    kind: str = "image"  # one of MM_KINDS: which placeholder token its run in token_ids uses
    # an image's or video's patch grid; an audio clip's is (1, 1, its token count)
    second_per_grid_t: float = 0.0  # a video's seconds per temporal patch (Qwen2.5-VL's M-RoPE)


class Prefill(Msg):
    request_id: str
    token_ids: list[int]  # the prompt, placeholders expanded
    params: SamplingParams
    mm: list[MMRef] = []
    decode_id: str = ""  # equal to the prefill instance's own id when it decodes too
    decode_address: str = ""
    deadline_s: float = 30.0  # how long to wait for features and for the KV destination


class KvReserve(Msg):
    """G -> D: preallocate blocks for a prompt that `prefill_address` will compute."""

    request_id: str
    num_prompt_tokens: int
    params: SamplingParams
    prefill_id: str
    prefill_address: str


class KvDest(Msg):
    """D -> P: the blocks reserved for the request, in prompt order, and where they live.

    D's pool is one buffer `kv` of layout [layers, 2, pool_blocks, block_size, kv_heads, head_dim], so
    the keys (k=0) or values (k=1) of layer l in block b start at ((l*2 + k)*pool_blocks + b)*block_bytes.
    """

    request_id: str
    block_ids: list[int]
    transfer_id: str
    pool_blocks: int
    block_bytes: int
    dataplane: dict = {}
    buffer_id: str = "kv"  # the destination pool's data-plane buffer (a new one after a role change)


class KvReady(Msg):
    """P -> D: the KV is written; go on from the first token."""

    request_id: str
    token_ids: list[int]  # prompt + first token
    num_prompt_tokens: int  # tokens whose KV was written (the prompt, or all but the last one moved)
    rope_delta: int = 0
    # a hand-off between decode instances: the request's own prompt length, so its output count
    # (max_tokens, seeded sampling's token index) goes on where it was; 0: num_prompt_tokens
    prompt_len: int = 0


# ---- results --------------------------------------------------------------------------------------


class FirstToken(Msg):
    request_id: str
    token_id: int
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    logprobs: Logprobs | None = None  # of token_id, when the request asked for logprobs
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class TokenUpdate(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True):
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: Logprobs | None = None  # of token_ids, when the request asked for logprobs
    # the request's output index of token_ids[0] (FIRST_TOKEN is 0): the gateway puts tokens from
    # different connections (prefill and decode; the two ends of a hand-off) back in order by it
    position: int = 0


class Tokens(Msg):
    """D -> G: every new token of one decode step for one gateway, in one message."""

    updates: list[TokenUpdate]


class RequestError(Msg):
    request_id: str
    message: str
    status: int = 500


class Abort(Msg):
    request_id: str


# ---- orchestration --------------------------------------------------------------------------------


class SetRoles(Msg):
    """G -> E,P,D: serve `roles` from now on; "" leaves the stack (drain). The gateway sends no new
    work for a role being left; the instance finishes what it holds for it (a decode instance is
    sent a Handoff for each request it may move), frees that role's memory, builds what a new role
    needs and registers again with its new roles, or sends Leaving and exits when `roles` is empty."""

    roles: str
    reason: str = ""


class Handoff(Msg):
    """G -> D: move `request_id`, with its KV, to the decode instance `decode_id`; its tokens go on
    from there. A request not held here (ended already) is ignored."""

    request_id: str
    decode_id: str
    decode_address: str


class Leaving(Msg):
    """E,P,D -> G: this instance holds no request and exits now; forget it without failing anything."""

    reason: str = ""


# frame 0 byte <-> type; append new types at the end, never renumber
MSG_TYPES: dict[int, type[Msg]] = {
    1: Register,
    2: RegisterAck,
    3: Heartbeat,
    10: Encode,
    11: FeatureOffer,
    12: FeatureDest,
    20: Prefill,
    21: KvReserve,
    22: KvDest,
    23: KvReady,
    30: FirstToken,
    31: Tokens,
    32: RequestError,
    40: Abort,
    50: SetRoles,
    51: Handoff,
    52: Leaving,
}
TYPE_CODES: dict[type[Msg], int] = {cls: code for code, cls in MSG_TYPES.items()}
