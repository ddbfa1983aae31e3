"""An MLP's activation run inside the packed linear before it, as a oneDNN post-op.

Every MLP of these models widens its input 2.7x to 4x, applies an activation and narrows it again.
Run apart, the activation is one to three more passes over that wide tensor (`quick_gelu` is a
multiply, a sigmoid and a multiply), which on a CPU cost about as much as a sixth of the MLP's
matmuls: 2 ms of a 20 ms vision-tower call of the `small` checkpoint. oneDNN applies an eltwise
post-op to each output tile while it is still in registers, so the pass disappears.

The fusion is made for transformers' own MLP modules only, recognised by class (their forward is
known: `fc2(act(fc1(x)))`, `down(act(gate(x)) * up(x))`), and only where the activation has an exact
oneDNN counterpart: SiLU (`swish`), GELU with erf or tanh (`gelu`), and `quick_gelu`, which is
`x * sigmoid(1.702 x) = swish(1.702 x) / 1.702`: the first linear's weight and bias are scaled by
1.702 and the second's weight by 1/1.702, the same function up to float rounding (1e-6 relative).
The activation module becomes an `nn.Identity`, so the module's forward is unchanged. Results equal
the unfused layers to 1e-6. Only float32 layers are fused: in bfloat16 oneDNN applies the activation
to the float32 accumulator before rounding, which is more accurate than rounding first but moves the
logits of a bfloat16 encoder about 0.06 away from transformers' own bfloat16 run, the oracle the
tests hold it to (1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

QUICK_GELU_SCALE = 1.702


@dataclass(frozen=True, slots=True)
class PostOp:
    """A `torch.ops.mkldnn._linear_pointwise` post-op: its name and algorithm."""

    attr: str
    algorithm: str = ""
    # quick_gelu: the first linear's output is scaled by this, the second's input scaled back
    input_scale: float = 1.0


# transformers' MLPs: class name -> (first linear, activation, second linear, gated). In a gated MLP
# the activation applies to the first (gate) projection, whose product with `up_proj` goes down.
MLP_LAYOUTS = {
    "VisionMlp": ("fc1", "act", "fc2", False),  # Qwen2-VL's vision blocks
    "Qwen3VLVisionMLP": ("linear_fc1", "act_fn", "linear_fc2", False),
    "Qwen3VLVisionPatchMerger": ("linear_fc1", "act_fn", "linear_fc2", False),
    "Qwen2MLP": ("gate_proj", "act_fn", "up_proj", True),
    "Qwen2_5_VLMLP": ("gate_proj", "act_fn", "up_proj", True),
    "Qwen3VLTextMLP": ("gate_proj", "act_fn", "up_proj", True),
}


def post_op_of(act: nn.Module) -> PostOp | None:
    """The oneDNN post-op computing `act` exactly, or None."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return PostOp("swish")
    if name == "QuickGELUActivation":
        return PostOp("swish", input_scale=QUICK_GELU_SCALE)
    if isinstance(act, nn.GELU):
        return PostOp("gelu", "tanh" if act.approximate == "tanh" else "none")
    if name == "GELUTanh" and getattr(act, "act", None) is not getattr(act, "_gelu_tanh_python", None):
        return PostOp("gelu", "tanh")  # transformers' C tanh GELU (not its Python variant)
    if name == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu:
        return PostOp("gelu", "none")
    return None


def plan_fusions(module: nn.Module, packable: set[int]) -> dict[int, PostOp]:
    """Fuse each MLP activation under `module` into the linear before it, where that linear is in
    `packable` (ids of layers about to be packed). Scales quick_gelu's weights and swaps the
    activation for an `nn.Identity` now; returns the post-op to pack each first linear with."""
    plan: dict[int, PostOp] = {}
    for mlp in module.modules():
        for first, act, second, gated in _layouts(mlp):
            op = post_op_of(act)
            if op is None or id(first) not in packable or first.weight.dtype != torch.float32:
                continue
            if gated and op.input_scale != 1.0:  # no second linear to take the scale back
                continue
            if op.input_scale != 1.0:
                _scale(first, op.input_scale, bias=True)
                _scale(second, 1.0 / op.input_scale, bias=False)
            _replace(mlp, act)
            plan[id(first)] = op
    return plan


def _layouts(mlp: nn.Module):
    """(first linear, activation, second linear, gated) of an MLP module, when it is one."""
    layout = MLP_LAYOUTS.get(type(mlp).__name__)
    if layout is not None:
        first, act, second = (getattr(mlp, name, None) for name in layout[:3])
        if isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and isinstance(act, nn.Module):
            yield first, act, second, layout[3]
    elif isinstance(mlp, nn.Sequential) and len(mlp) == 3:  # Qwen2-VL's patch merger: Linear, GELU, Linear
        first, act, second = mlp
        if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
            yield first, act, second, False


def _scale(linear: nn.Linear, factor: float, *, bias: bool) -> None:
    with torch.no_grad():
        linear.weight.mul_(factor)
        if bias and linear.bias is not None:
            linear.bias.mul_(factor)


def _replace(mlp: nn.Module, act: nn.Module) -> None:
    for name, child in mlp.named_children():
        if child is act:
            setattr(mlp, name, nn.Identity())
