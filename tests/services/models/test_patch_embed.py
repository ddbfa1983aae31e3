"""The matrix-product patch embedding equals transformers' Conv3d on every family that has one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.models.loader import load_model
from services.models.patch_embed import use_linear_patch_embed
from services.models.tiny import ensure_tiny_model
from tests.reference import hf_model, make_image


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_features_match_transformers_tower(family):
    path = str(ensure_tiny_model(family, "tiny"))
    ours = load_model(path, roles="E").family
    assert "forward" in vars(ours.visual.patch_embed)  # the matrix product is in place
    items = [ours.preprocess(make_image(56, 84, seed=s)) for s in (0, 1)]
    reference = hf_model(path).model.visual  # stock transformers: the Conv3d forward
    pixels = torch.cat([it.pixel_values for it in items])
    with torch.inference_mode():
        expected = reference.patch_embed(pixels)
        got = ours.visual.patch_embed(pixels)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # float summation order
    stock = load_model(path, attention="sdpa", roles="E").family  # the family's encode, stock tower
    assert "forward" not in vars(stock.visual.patch_embed)
    for got_rows, want_rows in zip(ours.encode(items), stock.encode(items), strict=True):
        torch.testing.assert_close(got_rows, want_rows, rtol=1e-4, atol=1e-4)


def test_only_kernel_equals_stride_convolutions_change():
    class Embed(nn.Module):
        def __init__(self, stride):
            super().__init__()
            self.embed_dim = 4
            self.proj = nn.Conv3d(3, 4, kernel_size=(2, 2, 2), stride=stride, bias=False)

    model = nn.ModuleDict({"plain": Embed((2, 2, 2)), "overlapping": Embed((1, 1, 1))})
    assert use_linear_patch_embed(model) == 1
    assert "forward" in vars(model["plain"])
    assert "forward" not in vars(model["overlapping"])
    x = torch.randn(5, 3 * 2 * 2 * 2)
    conv = model["plain"].proj(x.view(-1, 3, 2, 2, 2)).view(-1, 4)
    torch.testing.assert_close(model["plain"](x), conv, rtol=1e-5, atol=1e-6)
