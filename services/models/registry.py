"""Which model families we serve, keyed by the `model_type` of a checkpoint's config.json."""

from __future__ import annotations

from typing import Any


def family_class(model_type: str) -> Any:
    """The adapter class for `model_type`; imported lazily so the registry itself stays torch-free."""
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from services.models.qwen2_vl import Qwen2VLFamily

        return Qwen2VLFamily
    if model_type == "qwen3_vl":
        from services.models.qwen3_vl import Qwen3VLFamily

        return Qwen3VLFamily
    if model_type == "qwen2_audio":
        from services.models.qwen2_audio import Qwen2AudioFamily

        return Qwen2AudioFamily
    raise KeyError(model_type)


SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen2_audio", "qwen3_vl")
