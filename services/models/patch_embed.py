"""The vision tower's patch embedding as one matrix product instead of a 3-D convolution.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL embed patches with a `Conv3d` whose kernel equals its stride: every
output row is one flattened patch (channels x frames x rows x columns) times the kernel, nothing
overlaps and nothing is padded. That is exactly a `linear` of the flattened patches with the kernel
viewed as a matrix, which the image processor already hands us (`pixel_values` rows are flattened
patches, in the kernel's own order). On a CPU the convolution goes through oneDNN's direct kernel and
took 5.1 ms for one 224x224 image of the small checkpoint, the matrix product 0.7 ms (the whole
encoder call: 32.8 -> 28.7 ms, two threads; docs/benchmarks.md). The weight is not copied: the
convolution's own parameter is viewed at each call, so casts (`--encoder-dtype`) and device moves
still apply. Results match the convolution up to float summation order (1.4e-5 max abs difference
on features of magnitude 9 there); the oracle tests against transformers' `generate` cover it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _as_matrix_product(module: nn.Module) -> bool:
    """Whether `module` is a patch embedding whose convolution is a plain per-patch product."""
    conv = getattr(module, "proj", None)
    if not isinstance(conv, nn.Conv3d) or not hasattr(module, "embed_dim"):
        return False
    return (
        tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0, 0)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _linear_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.proj.weight
    rows = hidden_states.reshape(-1, weight[0].numel()).to(dtype=weight.dtype)
    return F.linear(rows, weight.view(weight.shape[0], -1), self.proj.bias).view(-1, self.embed_dim)


def use_linear_patch_embed(model: Any) -> int:
    """Give every kernel-equals-stride patch embedding under `model` the matrix-product forward;
    returns how many were changed (0 for a process without a vision tower, or an audio encoder)."""
    changed = 0
    for module in model.modules():
        if _as_matrix_product(module):
            module.forward = types.MethodType(_linear_forward, module)
            changed += 1
    return changed
