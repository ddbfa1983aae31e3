"""The gateway process stays small and starts fast, and stands apart from the model code.

Nothing it imports may pull in torch or transformers (seconds of start-up, hundreds of MB), and
nothing may come from `services/`: the gateway runs on machines and in images that hold no model
code, so the torch-free helpers both sides share live in `common/`. Every module of the package is
imported, so a new one is covered without being listed here.
"""

from __future__ import annotations

import json
import subprocess
import sys

COMMON_MODULES = [
    "common.tokenizer",
    "common.hashing",
    "common.prompting",
    "common.vision_geometry",
    "common.video",
    "common.video_sampling",
    "common.video_plan",
    "common.audio",
    "common.audio_sources",
    "common.audio_features",
]

CODE = f"""
import importlib, json, pkgutil, sys
import gateway
names = [m.name for m in pkgutil.walk_packages(gateway.__path__, "gateway.")] + {COMMON_MODULES!r}
for name in names:
    importlib.import_module(name)
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
services = [m for m in sys.modules if m == "services" or m.startswith("services.")]
print(json.dumps({{"imported": names, "heavy": heavy, "services": sorted(services)}}))
"""


def _import_gateway() -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_gateway_imports_neither_torch_nor_services() -> None:
    found = _import_gateway()
    assert {"gateway.app", "gateway.preprocess", "gateway.images", "gateway.audios"} <= set(found["imported"])
    assert found["heavy"] == [], f"the gateway imported {found['heavy']}"
    assert found["services"] == [], f"the gateway imported {found['services']}"
