"""Fixtures of the engine's fidelity tests: each family's tiny checkpoint, loaded once per module."""

from __future__ import annotations

import pytest

from services.models.loader import load_model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tiny_qwen2_vl, tiny_qwen2_5_vl):
    return {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[request.param]


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)
