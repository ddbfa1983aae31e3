"""The prefill -> decode hand-off as the workers do it, in one process and without sockets.

A prefill-only engine computes the prompt and samples the first token; a decode engine, whose pool
is a flat byte buffer as a data plane hands it in, reserves blocks; the prompt's KV is copied into
them as raw bytes at the offsets a data plane writes (`block_offset`), from the prefill's own blocks,
whose ids differ; the decode engine admits the request and decodes on.
"""

from __future__ import annotations

from typing import Any

import torch

from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.kv_cache import block_offset
from services.engine.memory import size_kv_pool
from services.engine.sequence import SequenceStatus


def copy_blocks(
    prefill: Engine, decode: Engine, decode_buffer: torch.Tensor, src: list[int], dst: list[int]
) -> None:
    """Write the prefill's blocks `src` into the decode pool's blocks `dst`, byte for byte."""
    pool, bb = prefill.kv.pool, decode.kv.block_bytes
    for layer in range(prefill.layout.num_layers):
        for kind in (0, 1):
            for s, d in zip(src, dst, strict=True):
                offset = block_offset(layer, kind, d, decode.kv.num_blocks, bb)
                decode_buffer[offset : offset + bb] = (
                    pool[layer, kind, s].contiguous().view(torch.uint8).view(-1)
                )


def split_generate(
    loaded: Any,
    token_ids: list[int],
    items: list[Any],
    params: SamplingParams,
    config: EngineConfig,
    *,
    keep_logits: bool = False,
    forget_rope_delta: bool = False,
) -> tuple[list[int], list[Any]]:
    """Tokens (and logits, with `keep_logits`) of one request served by a prefill and a decode engine."""
    fam = loaded.family
    inputs = fam.model_inputs(token_ids, [i.grid_thw for i in items], fam.encode(items))
    prefill = Engine(fam, loaded.eos_token_ids, config, prefill_only=True, keep_logits=keep_logits)
    prefill.add_request("s", token_ids, params, inputs)
    outs = []
    while prefill.has_unfinished():
        outs += prefill.step()
    (first,) = outs
    assert not first.finished, "the first token ended the request: nothing to hand over"
    seq = prefill.scheduler.requests["s"]
    assert seq.status is SequenceStatus.PREFILLED

    buffer = torch.zeros(size_kv_pool(fam, config).nbytes, dtype=torch.uint8)
    decode = Engine(fam, loaded.eos_token_ids, config, keep_logits=keep_logits, kv_buffer=buffer)
    # another reservation holds the first blocks: the prompt lands in other block ids than at prefill
    assert decode.reserve("other", 40, params) is not None
    blocks = decode.reserve("s", len(token_ids), params)
    assert blocks is not None and blocks != seq.block_table[: len(blocks)]
    copy_blocks(prefill, decode, buffer, seq.block_table[: len(blocks)], blocks)
    prefill.release_prefilled("s")
    bm = prefill.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "the prefill engine should have let go of the KV"

    rope_delta = inputs.rope_delta
    if forget_rope_delta:
        assert rope_delta != 0, "an image prompt should shift decode positions"
        rope_delta = 0
    decode.admit_reserved("s", seq.token_ids, rope_delta)
    tokens, logits = list(first.new_token_ids), [first.logits]
    while decode.has_unfinished():
        for out in decode.step():
            tokens += out.new_token_ids
            logits.append(out.logits)
    assert decode.abort("other")
    bm = decode.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "decode should free every block"
    return tokens, logits
