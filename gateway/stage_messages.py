"""What the gateway tells each stage about one request, built from the request and its placement.

KV_RESERVE to a decode instance apart from the prefill (blocks for the prompt's KV), ENCODE to the
encode instance (the items in prompt order, their bytes as raw frames, the prefill that gets the
features) and PREFILL to the prefill instance (the expanded prompt, what each item contributes, where
decoding happens). Pure functions: the cluster sends them.
"""

from __future__ import annotations

from common.protocol import Encode, KvReserve, MMItem, MMRef, Prefill
from gateway.backend import GenerateRequest
from gateway.registry import Instance


def kv_reserve(req: GenerateRequest, prefill: Instance) -> KvReserve:
    return KvReserve(
        request_id=req.request_id, num_prompt_tokens=len(req.token_ids), params=req.params,
        prefill_id=prefill.id, prefill_address=prefill.address,
    )  # fmt: skip


def encode(req: GenerateRequest, prefill: Instance) -> tuple[Encode, list[bytes]]:
    """The ENCODE message and its frames (item i's bytes are frame i)."""
    items = [
        MMItem(hash=m.hash, frame=i, kind=m.kind, video=m.video, max_seconds=m.max_seconds)
        for i, m in enumerate(req.images)
    ]
    msg = Encode(
        request_id=req.request_id, items=items, prefill_id=prefill.id, prefill_address=prefill.address,
        prefill_dataplane=prefill.info.dataplane,
    )  # fmt: skip
    return msg, [m.data for m in req.images]


def prefill(req: GenerateRequest, decode: Instance, deadline_s: float) -> Prefill:
    mm = [
        MMRef(
            hash=m.hash, grid_thw=tuple(m.grid_thw), num_tokens=m.num_tokens, kind=m.kind,
            second_per_grid_t=m.second_per_grid_t,
        )
        for m in req.images
    ]  # fmt: skip
    return Prefill(
        request_id=req.request_id, token_ids=req.token_ids, params=req.params, mm=mm,
        decode_id=decode.id, decode_address=decode.address, deadline_s=deadline_s,
    )  # fmt: skip
