"""Linear layers on a CPU through oneDNN, with their weights packed once at load time.

`F.linear` on a CPU calls the BLAS library torch was built with (MKL on x86). For the few rows of a
decode step (and the few hundred of a prefill chunk or an image) oneDNN's matmul, with the weight
reordered once into its own blocked layout, is faster: on an AMD EPYC machine a decode step of the
`small` checkpoint ran 1.21x to 1.27x faster at batch 8 and 16 on one thread, 1.69x to 1.84x on
two, and the encoder 1.15x to 1.20x (`python -m bench.packed_linear`; docs/benchmarks.md). vLLM's
CPU backend packs its linear weights for oneDNN in the same way.

The layer stays an `nn.Linear` (hooks, `isinstance` checks and the module tree are unchanged); its
`weight` becomes the packed tensor, not a copy, so memory does not grow, and its forward calls
oneDNN. Results equal `F.linear` up to float summation order (5e-5 max abs difference on outputs of
magnitude 20 in fp32); the oracle tests against transformers' `generate` cover it. Packing is the
last thing done to a module: a packed weight cannot be cast or moved (`--encoder-dtype` casts first).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from services.models.fused_activation import PostOp, plan_fusions

MODES = ("auto", "onednn", "torch")
# the row count oneDNN picks its packed layout for; any row count works with it
BATCH_HINT = 16
NO_POST_OP = PostOp("none")


def onednn_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run a CPU linear in `dtype` on this machine."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != self.weight.dtype:  # F.linear refuses this too; oneDNN's own error would not say it
        raise RuntimeError(f"a {x.dtype} input to a linear layer packed in {self.weight.dtype}")
    op = self.post_op
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, op.attr, [], op.algorithm)


def is_packed(linear: nn.Module) -> bool:
    return isinstance(linear, nn.Linear) and linear.weight.is_mkldnn


def pack_linears(module: nn.Module | None, mode: str = "auto", *, fuse: bool = True) -> int:
    """Pack every CPU `nn.Linear` under `module` for oneDNN ("torch" leaves them to `F.linear`).
    Layers already packed, on another device, or sharing their weight with an embedding are left as
    they are, and so, with "auto", are those in a dtype oneDNN cannot run here; "onednn" refuses
    those instead. With `fuse`, each MLP activation runs inside the linear before it
    (services/models/fused_activation.py). Returns how many were packed. Idempotent."""
    if mode not in MODES:
        raise ValueError(f"linear backend must be one of {', '.join(MODES)}, got {mode!r}")
    if module is None or mode == "torch":
        return 0
    tied = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    layers = [
        layer for layer in module.modules()
        if isinstance(layer, nn.Linear) and not is_packed(layer)
        and id(layer.weight) not in tied  # an lm_head tied to the embedding: packing would copy it
        and layer.weight.device.type == "cpu"
    ]  # fmt: skip
    unsupported = {layer.weight.dtype for layer in layers if not onednn_supported(layer.weight.dtype)}
    if unsupported and mode == "onednn":  # refused before anything is packed
        raise ValueError(f"oneDNN cannot run a {min(map(str, unsupported))} linear layer on this machine")
    layers = [layer for layer in layers if layer.weight.dtype not in unsupported]
    fusions = plan_fusions(module, {id(layer) for layer in layers}) if fuse else {}
    packed = 0
    for layer in layers:
        with torch.no_grad():
            layer.weight = nn.Parameter(
                torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), BATCH_HINT),
                requires_grad=False,
            )
        layer.post_op = fusions.get(id(layer), NO_POST_OP)
        layer.forward = types.MethodType(_packed_forward, layer)
        packed += 1
    return packed
