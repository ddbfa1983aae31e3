"""What a prefill instance checks in PREFILL, FEATURE_OFFER and KV_DEST before it uses them.

Each check returns the problem as a sentence naming the field, or None (services/wire_checks.py).
The limits come from this instance's model and engine: its vocabulary and context, how image grids
become placeholder tokens, the width of an encoder feature row, and the KV block geometry a decode
instance must share with it for the blocks it names to mean anything here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.placeholder_runs import item_run_starts, run_lengths
from common.protocol import MM_KINDS, FeatureOffer, KvDest, Prefill
from services.wire_checks import id_problem, token_problem, vocab_size

MAX_DEADLINE_S = 600.0  # the gateway sends 30 s; a deadline past this would pin features for hours
MAX_POOL_BLOCKS = 2**31  # block offsets are computed from it: keep them within 64-bit byte offsets
MAX_SECOND_PER_GRID_T = 3600.0  # a temporal patch of frames sampled an hour apart, at the slowest
FEATURE_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}  # name -> bytes per element


@dataclass(frozen=True, slots=True)
class KvGeometry:
    """What a KV_DEST must match to be written from this instance's pool: one block's tokens and
    bytes, and the data plane the blocks travel on."""

    block_size: int
    block_bytes: int
    dataplane_backend: str

    @classmethod
    def of(cls, engine: Any, dataplane: Any) -> KvGeometry:
        kv = engine.kv
        return cls(kv.block_size, kv.block_bytes, dataplane.descriptor().get("backend", ""))


@dataclass(frozen=True, slots=True)
class PrefillLimits:
    vocab_size: int
    max_model_len: int
    image_token_id: int | None  # None: the model takes no images
    merge_size: int  # patches merged per side into one placeholder token
    hidden_size: int | None  # width of one feature row; None: not checked
    kv: KvGeometry  # what a KV_DEST must match
    max_feature_bytes: int  # the feature cache: one item larger than it could never be kept
    video_token_id: int | None = None  # None: the model takes no videos
    audio_token_id: int | None = None  # None: the model takes no audio
    video_runs_per_patch: bool = False  # Qwen3-VL: a run per temporal patch, timestamps between

    @classmethod
    def of(cls, family: Any, engine: Any, dataplane: Any, cache_bytes: int) -> PrefillLimits:
        return cls(
            vocab_size=vocab_size(family), max_model_len=engine.max_model_len,
            image_token_id=getattr(family, "image_token_id", None),
            merge_size=int(getattr(family, "merge_size", 1)),
            # a row's width: the hidden size, times (1 + DeepStack levels) for Qwen3-VL
            hidden_size=getattr(family, "feature_width", None) or getattr(family, "hidden_size", None),
            kv=KvGeometry.of(engine, dataplane), max_feature_bytes=cache_bytes,
            video_token_id=getattr(family, "video_token_id", None),
            audio_token_id=getattr(family, "audio_token_id", None),
            video_runs_per_patch=bool(getattr(family, "video_runs_per_patch", False)),
        )  # fmt: skip


def prefill_problem(msg: Prefill, lim: PrefillLimits, *, decodes: bool) -> str | None:
    """`decodes`: this instance decodes its requests itself (no decode instance to name)."""
    problem = id_problem("request_id", msg.request_id) or token_problem(
        "token_ids", msg.token_ids, lim.vocab_size
    )
    if problem:
        return problem
    n = len(msg.token_ids)
    if n >= lim.max_model_len:
        return (
            f"token_ids: a prompt of {n} tokens leaves no room for output within the context of "
            f"{lim.max_model_len} tokens"
        )
    if not (math.isfinite(msg.deadline_s) and 0 <= msg.deadline_s <= MAX_DEADLINE_S):
        return f"deadline_s must be between 0 and {MAX_DEADLINE_S:g} seconds, got {msg.deadline_s}"
    if not decodes:
        problem = id_problem("decode_id", msg.decode_id) or id_problem("decode_address", msg.decode_address)
        if problem:
            return problem
    return mm_problem(msg, lim)


def mm_problem(msg: Prefill, lim: PrefillLimits) -> str | None:
    """Each item's grid must merge into whole tokens, and each item must find its placeholder runs in
    the prompt (one run of exactly its token count, a Qwen3-VL video one per temporal patch), in the
    order of `mm`: the i-th run of a kind begins at the first placeholder of that kind after the
    previous run (common/placeholder_runs.py). Placeholders past the runs, and any of a kind the
    message has no items of, are ordinary text tokens, as vLLM serves them. The runs are what the
    M-RoPE positions and the features' rows follow. (`num_tokens` says the same for whoever reads the
    message; the grid decides here. An audio clip's grid is (1, 1, tokens), with the audio family's
    merge 1.)"""
    if not msg.mm:
        return None
    pads = {"image": lim.image_token_id, "video": lim.video_token_id, "audio": lim.audio_token_id}
    m = lim.merge_size
    for i, ref in enumerate(msg.mm):
        if problem := id_problem(f"mm[{i}].hash", ref.hash):
            return problem
        if ref.kind not in MM_KINDS:
            return f"mm[{i}].kind {ref.kind[:32]!r} is not one of {', '.join(MM_KINDS)}"
        if pads[ref.kind] is None:
            return f"mm[{i}]: this model takes no {'audio' if ref.kind == 'audio' else ref.kind + 's'}"
        t, h, w = ref.grid_thw
        if min(t, h, w) < 1 or h % m or w % m:
            return f"mm[{i}]: grid_thw {list(ref.grid_thw)} is not a grid of whole {m}x{m} merged patches"
        if ref.kind == "image" and (t != 1 or ref.second_per_grid_t != 0):
            return f"mm[{i}]: an image has one temporal patch and no second_per_grid_t"
        if ref.kind == "audio" and (t != 1 or h != 1 or ref.second_per_grid_t != 0):
            return f"mm[{i}]: an audio clip's grid is [1, 1, tokens], with no second_per_grid_t"
        s = ref.second_per_grid_t
        if ref.kind == "video" and not (math.isfinite(s) and 0 < s <= MAX_SECOND_PER_GRID_T):
            return f"mm[{i}].second_per_grid_t must be in (0, {MAX_SECOND_PER_GRID_T:g}], got {s}"
    starts: list[int] = [0] * len(msg.mm)
    for kind in dict.fromkeys(ref.kind for ref in msg.mm):  # each kind present, in order
        chosen = [i for i, ref in enumerate(msg.mm) if ref.kind == kind]
        lengths = [run_lengths(kind, msg.mm[i].grid_thw, m, lim.video_runs_per_patch) for i in chosen]
        try:
            found = item_run_starts(msg.token_ids, pads[kind], [n for runs in lengths for n in runs])
        except ValueError as exc:
            return f"mm: the {kind} items' placeholder runs are not in token_ids: {exc}"
        at = 0
        for i, runs in zip(chosen, lengths, strict=True):
            starts[i] = found[at]
            at += len(runs)
    if starts != sorted(starts):
        return "mm: the items are not in the prompt order of their placeholder runs"
    return None


def grid_tokens(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    t, h, w = grid_thw
    return t * (h // merge_size) * (w // merge_size)


def features_problem(index: int, ref: Any, features: Any, merge_size: int) -> str | None:
    """Features that arrived for a request's image or video must have one row per placeholder token."""
    rows, wanted = int(features.shape[0]), grid_tokens(ref.grid_thw, merge_size)
    if rows != wanted:
        return f"mm[{index}]: the features of {ref.kind} {ref.hash[:12]} have {rows} rows, its grid makes {wanted}"
    return None


def feature_offer_problem(msg: FeatureOffer, lim: PrefillLimits, incoming_bytes: int = 0) -> str | None:
    """`incoming_bytes`: set aside for offers still arriving; with this one they must fit the cache."""
    problem = id_problem("hash", msg.hash) or id_problem("encoder_address", msg.encoder_address)
    if problem:
        return problem
    itemsize = FEATURE_DTYPES.get(msg.dtype)
    if itemsize is None:
        return f"dtype {msg.dtype[:32]!r} is not a feature dtype ({', '.join(FEATURE_DTYPES)})"
    if len(msg.shape) != 2 or min(msg.shape) < 1:
        return f"shape {msg.shape[:4]} is not [rows, width] with both at least 1"
    if msg.shape[0] >= lim.max_model_len:
        return f"shape: {msg.shape[0]} rows, more image tokens than a prompt of this model can hold"
    if lim.hidden_size is not None and msg.shape[1] != lim.hidden_size:
        return f"shape: rows of {msg.shape[1]} values, this model's features have {lim.hidden_size}"
    if msg.nbytes != msg.shape[0] * msg.shape[1] * itemsize:
        return f"nbytes {msg.nbytes} is not what shape {msg.shape} of {msg.dtype} takes"
    if incoming_bytes + msg.nbytes > lim.max_feature_bytes:
        return (
            f"nbytes {msg.nbytes}: with the {incoming_bytes} bytes of features still arriving, more than "
            f"the feature cache holds ({lim.max_feature_bytes})"
        )
    return None


def kv_dest_problem(msg: KvDest, lim: KvGeometry, num_prompt_tokens: int | None = None) -> str | None:
    """The fields alone; with `num_prompt_tokens` (the request is known) the block count too."""
    if problem := id_problem("transfer_id", msg.transfer_id) or id_problem("buffer_id", msg.buffer_id):
        return problem
    if msg.block_bytes != lim.block_bytes:
        return (
            f"block_bytes {msg.block_bytes} is not this instance's {lim.block_bytes}: the two KV pools "
            "do not hold the same model"
        )
    if msg.dataplane.get("backend") != lim.dataplane_backend:
        return f"dataplane: not a {lim.dataplane_backend} descriptor"
    if not 1 <= msg.pool_blocks <= MAX_POOL_BLOCKS:
        return f"pool_blocks must be between 1 and {MAX_POOL_BLOCKS}, got {msg.pool_blocks}"
    ids = msg.block_ids
    if ids and (min(ids) < 0 or max(ids) >= msg.pool_blocks):
        return f"block_ids must lie in [0, {msg.pool_blocks})"
    if len(set(ids)) != len(ids):
        return "block_ids: a block is listed twice"
    if num_prompt_tokens is not None:
        need = -(-num_prompt_tokens // lim.block_size)
        if len(ids) != need:
            return (
                f"block_ids: {len(ids)} blocks for a prompt of {num_prompt_tokens} tokens, which takes {need}"
            )
    return None
