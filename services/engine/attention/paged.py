"""`epd_paged`: the attention function transformers' decoder layers call.

transformers lets a model pick its attention function by name (`AttentionInterface`). The decoder
layers stay transformers' code, RoPE included; this function writes the step's new keys and values into
the engine's block pool by slot mapping, tells the step's layer hook (a prefill stage ships the layer to
decode while the next one computes), and leaves the attention itself to the engine's backend.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from services.engine.attention.base import AttentionMetadata

PAGED_ATTENTION = "epd_paged"


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if paged is None:
        raise RuntimeError("epd_paged attention called without AttentionMetadata (pass paged=...)")
    layer = module.layer_idx
    k_cache, v_cache = paged.kv.layer(layer)
    k_cache.index_copy_(0, paged.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, paged.slot_mapping, value[0].transpose(0, 1))
    if paged.on_layer is not None:
        paged.on_layer(layer)
    out = paged.backend.attend(paged.state, layer, query, key, value, scaling)
    return out.unsqueeze(0), None


def register_paged_attention() -> str:
    """Make `epd_paged` selectable as an attention implementation; idempotent."""
    AttentionInterface.register(PAGED_ATTENTION, paged_attention)
    return PAGED_ATTENTION
