"""A step's inputs as the model runner builds them on the host, before they go to the device.

What the eager forward copies to the device, and what a decode CUDA graph copies into its buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.attention import StepLayout


@dataclass(slots=True)
class HostStep:
    """A step's inputs on the host, padded: what is copied to the device (or into graph buffers)."""

    layout: StepLayout
    token_ids: torch.Tensor  # [padded] long
    positions: torch.Tensor  # [3, padded] long (prefill rows with M-RoPE positions are filled on device)
    slots: torch.Tensor  # [padded] long
    sample_rows: list[int]  # the row of each sampling chunk's last token
