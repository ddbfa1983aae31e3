"""MLP activations fused into the packed linear before them: each of transformers' MLPs these models
use gives what it gave unfused, its activation module is gone, and activations without an exact
oneDNN counterpart are left alone. Whole models are covered by the oracle tests (tokens and logits
against transformers' `generate`), which load through `load_model` and so run fused on a CPU."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger, Qwen2MLP, VisionMlp
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionMLP, Qwen3VLVisionPatchMerger

from services.models.fused_activation import QUICK_GELU_SCALE, PostOp, post_op_of
from services.models.packed_linear import onednn_supported, pack_linears

pytestmark = pytest.mark.skipif(not onednn_supported(torch.float32), reason="torch was built without oneDNN")


def _gated(cls, act: str) -> nn.Module:
    return cls(SimpleNamespace(hidden_size=48, intermediate_size=112, hidden_act=act))


def _qwen3_vision(act: str) -> Qwen3VLVisionConfig:
    return Qwen3VLVisionConfig(hidden_size=48, intermediate_size=112, hidden_act=act, out_hidden_size=40)


MLPS = {  # each takes rows of 48 values (a merger's norm sees 48, its MLP four rows together)
    "qwen2-vl vision, quick_gelu": lambda: VisionMlp(48, 160, "quick_gelu"),
    "qwen2-vl merger, erf gelu": lambda: PatchMerger(40, 48, spatial_merge_size=2),
    "qwen2 text, silu": lambda: _gated(Qwen2MLP, "silu"),
    "qwen2.5-vl vision, silu": lambda: _gated(Qwen2_5_VLMLP, "silu"),
    "qwen3-vl vision, tanh gelu": lambda: Qwen3VLVisionMLP(_qwen3_vision("gelu_pytorch_tanh")),
    "qwen3-vl merger, erf gelu": lambda: Qwen3VLVisionPatchMerger(_qwen3_vision("gelu_pytorch_tanh")),
}


@pytest.mark.parametrize("name", list(MLPS))
def test_a_fused_mlp_gives_what_it_gave_unfused(name):
    torch.manual_seed(0)
    mlp = MLPS[name]().eval()
    x = torch.randn(40, 48) * 3  # wide enough to reach both tails of the activations
    with torch.no_grad():
        expected = mlp(x)
        unfused = copy.deepcopy(mlp)
        assert pack_linears(unfused, fuse=False) == pack_linears(mlp) > 0
        assert sum(isinstance(m, nn.Identity) for m in mlp.modules()) == 1  # the activation is gone
        assert not any(isinstance(m, nn.Identity) for m in unfused.modules())
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unfused(x), expected, rtol=1e-5, atol=1e-5)
        assert pack_linears(mlp) == 0  # idempotent: nothing scaled or fused twice
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_supported(torch.bfloat16), reason="no bfloat16 oneDNN linear on this CPU")
def test_bfloat16_mlps_are_packed_but_keep_their_activation_apart():
    """Fused, bfloat16 would round after the activation instead of before: closer to float32, but
    not transformers' bfloat16 result, which the bfloat16 encoder's oracle test holds it to."""
    torch.manual_seed(0)
    mlp = MLPS["qwen2-vl vision, quick_gelu"]().eval().to(torch.bfloat16)
    x = torch.randn(40, 48, dtype=torch.bfloat16)
    expected = mlp(x).detach()
    assert pack_linears(mlp) == 2
    assert mlp.fc1.post_op == PostOp("none") and not isinstance(mlp.act, nn.Identity)
    torch.testing.assert_close(mlp(x).detach(), expected, rtol=2e-2, atol=2e-2)


def test_quick_gelu_moves_its_scale_into_the_weights():
    torch.manual_seed(0)
    mlp = VisionMlp(8, 16, "quick_gelu")
    w1, b1, w2, b2 = (
        t.detach().clone() for t in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    )
    pack_linears(mlp)
    assert mlp.fc1.post_op == PostOp("swish", input_scale=QUICK_GELU_SCALE)
    assert mlp.fc2.post_op == PostOp("none")
    dense = lambda layer: layer.weight.to_dense()  # noqa: E731
    torch.testing.assert_close(dense(mlp.fc1), w1 * QUICK_GELU_SCALE)
    torch.testing.assert_close(mlp.fc1.bias, b1 * QUICK_GELU_SCALE)
    torch.testing.assert_close(dense(mlp.fc2), w2 / QUICK_GELU_SCALE)
    torch.testing.assert_close(mlp.fc2.bias, b2)  # the output is back at scale: its bias stays


def test_activations_without_an_exact_onednn_post_op_stay_apart():
    assert post_op_of(nn.ReLU()) is None
    assert post_op_of(ACT2FN["gelu_new"]) is None  # the Python tanh formula: not bit-for-bit oneDNN's
    assert post_op_of(ACT2FN["gelu_python"]) is None
    assert post_op_of(ACT2FN["gelu"]) == PostOp("gelu", "none")
    assert post_op_of(ACT2FN["gelu_pytorch_tanh"]) == PostOp("gelu", "tanh")
    assert post_op_of(nn.SiLU()) == post_op_of(ACT2FN["silu"]) == PostOp("swish")
    mlp = VisionMlp(8, 16, "gelu_new")
    x = torch.randn(5, 8)
    expected = mlp(x).detach()
    pack_linears(mlp)
    assert not any(isinstance(m, nn.Identity) for m in mlp.modules())
    torch.testing.assert_close(mlp(x).detach(), expected, rtol=1e-5, atol=1e-5)


def test_a_gated_mlp_with_quick_gelu_is_left_unfused():
    """Its gate's output is multiplied by `up_proj`'s before going down: no second linear to take
    the scale back, so quick_gelu stays apart there."""
    mlp = _gated(Qwen2MLP, "quick_gelu")
    x = torch.randn(5, 48)
    expected = mlp(x).detach()
    pack_linears(mlp)
    assert mlp.gate_proj.post_op == PostOp("none")
    torch.testing.assert_close(mlp(x).detach(), expected, rtol=1e-5, atol=1e-5)
