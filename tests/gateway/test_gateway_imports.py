"""The gateway process stays small and starts fast: nothing it imports may pull in torch or transformers."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "gateway.app",
    "gateway.backend",
    "gateway.config",
    "gateway.openai_api",
    "gateway.preprocess",
    "gateway.streaming",
    "gateway.metrics",
    "common.tokenizer",
    "common.hashing",
]


def test_gateway_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"the gateway imported {result.stdout.strip()}"
