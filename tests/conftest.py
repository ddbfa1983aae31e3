"""Shared fixtures: tiny random-weight checkpoints, built once per test session.

Building one takes a fraction of a second, but loading torch and transformers does not, so the whole
session shares one checkpoint per family (read-only: tests must not write into these folders).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.models.tiny import make_tiny_model

    return make_tiny_model("qwen2_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_vl-tiny", preset="tiny")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.models.tiny import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_5_vl-tiny", preset="tiny")


@pytest.fixture(scope="session")
def tiny_qwen2_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.models.tiny import make_tiny_model

    return make_tiny_model("qwen2_audio", tmp_path_factory.mktemp("ckpt") / "qwen2_audio-tiny", preset="tiny")


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.models.tiny import make_tiny_model

    return make_tiny_model("qwen3_vl", tmp_path_factory.mktemp("ckpt") / "qwen3_vl-tiny", preset="tiny")
