"""CPU linear layers packed for oneDNN: the same outputs as `F.linear` (up to float summation order),
packed once, tied heads and other devices left alone, and a loaded model packed only where asked.

That packed models still give transformers' greedy tokens and logits is what every oracle test of the
engine and the stacks checks: they load through `load_model`, which packs by default on a CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.models.encoder_dtype import set_encoder_dtype
from services.models.loader import ModelLoadError, load_model
from services.models.packed_linear import is_packed, onednn_supported, pack_linears

pytestmark = pytest.mark.skipif(not onednn_supported(torch.float32), reason="torch was built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 48), (1, 1, 48), (2, 7, 48)])
def test_a_packed_layer_gives_what_f_linear_gives(bias, shape):
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=bias)
    weight, x = layer.weight.detach().clone(), torch.randn(*shape)
    expected = F.linear(x, weight, layer.bias)
    assert pack_linears(layer) == 1 and is_packed(layer)
    assert layer.weight.shape == weight.shape  # the packed tensor replaces the weight: no copy kept
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_layers_are_packed_where_the_cpu_runs_them():
    layer = nn.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    expected = layer(x)
    if not onednn_supported(torch.bfloat16):  # no AVX-512 BF16 or AMX: F.linear keeps it
        assert pack_linears(layer) == 0
        return
    assert pack_linears(layer) == 1
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="float32 input to a linear layer packed in torch.bfloat16"):
        layer(x.float())


def test_packing_is_idempotent_and_leaves_tied_heads_and_torch_mode_alone():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 8), "head": nn.Linear(8, 10, bias=False),
                           "mlp": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))})  # fmt: skip
    model["head"].weight = model["embed"].weight  # a tied lm_head
    assert pack_linears(model, "torch") == 0
    assert pack_linears(model) == 2 and pack_linears(model) == 0
    assert not is_packed(model["head"]) and model["head"].weight is model["embed"].weight
    assert pack_linears(None) == 0
    with pytest.raises(ValueError, match="linear backend must be one of auto, onednn, torch"):
        pack_linears(model, "mkl")


def test_onednn_refuses_a_dtype_it_cannot_run_where_auto_leaves_it_to_f_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.float16))
    with pytest.raises(ValueError, match="oneDNN cannot run a torch.float16 linear layer"):
        pack_linears(model, "onednn")
    assert pack_linears(model, "auto") == 1 and is_packed(model[0]) and not is_packed(model[1])


def test_a_model_is_packed_on_cpu_unless_asked_not_to(tiny_qwen2_vl):
    def packed(loaded) -> tuple[int, int]:
        layers = [m for m in loaded.family.model.modules() if isinstance(m, nn.Linear)]
        return sum(is_packed(m) for m in layers), len(layers)

    n, total = packed(load_model(tiny_qwen2_vl))
    assert n > 0 and n >= total - 1  # every layer but a tied lm_head
    assert packed(load_model(tiny_qwen2_vl, linear_backend="torch"))[0] == 0
    assert packed(load_model(tiny_qwen2_vl, attention="sdpa"))[0] == 0  # the stock reference modules
    with pytest.raises(ModelLoadError, match="linear backend must be one of"):
        load_model(tiny_qwen2_vl, linear_backend="blas")


def test_a_packed_encoder_is_cast_before_it_is_packed_not_after(tiny_qwen2_vl):
    loaded = load_model(tiny_qwen2_vl, roles="E")
    set_encoder_dtype(loaded.family, "float32")  # its own dtype: nothing to do
    with pytest.raises(ValueError, match="pass encoder_dtype='bfloat16' to load_model"):
        set_encoder_dtype(loaded.family, "bfloat16")
