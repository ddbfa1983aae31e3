"""Tests that need an NVIDIA GPU: skipped on machines without one (CI), run by scripts/gpu_check.sh."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import images, reference  # noqa: F401  (fixtures shared with the e2e tests)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
