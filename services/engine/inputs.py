"""What the model runner needs about a prompt beyond its token ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class ModelInputs:
    """Per-request model inputs.

    `mm_embeds` holds the encoder features of every multimodal placeholder token, in prompt order;
    `mm_token_indices` the prompt index of each such token (sorted), so any prefill chunk finds its rows
    by bisection. `positions` are the prompt's M-RoPE positions `[3, prompt_len]` (None: plain
    0..n-1); a token at index `i` past the prompt sits at `i + rope_delta` on all three axes, which is
    all a decode stage needs to know about the prompt's images.

    `deepstack` (Qwen3-VL) holds further encoder features of the same tokens, `[tokens, levels,
    hidden]` aligned with `mm_token_indices`: level `k` is added to those tokens' hidden states after
    decoder layer `k`, so the runner passes each prefill chunk's rows of it to the model.
    """

    rope_delta: int = 0
    positions: torch.Tensor | None = None
    mm_embeds: torch.Tensor | None = None
    mm_token_indices: list[int] = field(default_factory=list)
    deepstack: torch.Tensor | None = None
