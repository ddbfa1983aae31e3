"""Load a Hugging Face checkpoint from a local folder, the parts of it that a process's roles need.

The folder must hold config.json, safetensors weights and a tokenizer, as `save_pretrained` writes them
(`epd-serve make-tiny-model` builds such folders offline). Anything else is refused with a message that
says what is wrong, before any weight is read.

A process with both the vision tower and the language model to run (roles with E and P or D) loads the
whole model through transformers' `from_pretrained`. One with E only builds the vision tower alone, one
without E the language model alone (services/models/stage_weights.py): the other part's weights are
never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.models.registry import SUPPORTED_MODEL_TYPES, family_class
from services.models.stage_weights import TEXT, VISION, StageWeightsError, load_parts, parts_for_roles
from services.models.video_patches import read_video_config


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    path: Path
    model_type: str
    family: Any  # the family adapter (e.g. Qwen2VLFamily)
    tokenizer: Any
    eos_token_ids: list[int]
    parts: frozenset[str] = frozenset({VISION, TEXT})  # what was loaded: "vision", "text"

    @property
    def name(self) -> str:
        return self.path.name


def read_model_type(path: str | Path) -> str:
    """Validate the folder and return its `model_type`, without importing torch."""
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; pass the folder that holds config.json")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face checkpoint: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} of {folder} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    return model_type


def _eos_ids(folder: Path, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    attention: str | None = None,
    roles: str = "EPD",
    encoder_dtype: str | None = None,
    linear_backend: str = "auto",
) -> LoadedModel:
    """Load weights, tokenizer, the family's preprocessor (image processor and video settings, or audio
    feature extractor); `attention` names the text attention implementation
    (default: the engine's paged attention and a matrix-product patch embedding,
    services/models/patch_embed.py; "sdpa" gives transformers' stock model for references).

    `roles` (some of "EPD") says which weights: the vision tower (or audio encoder) for E, the language
    model, embeddings and lm_head for P and D. `encoder_dtype` casts the encoder part
    (services/models/encoder_dtype.py). On a CPU the linear layers are then packed for oneDNN
    (services/models/packed_linear.py) unless `linear_backend` is "torch" or the stock reference
    modules were asked for; packing comes last, since a packed weight cannot be cast."""
    model_type = read_model_type(path)
    folder = Path(path).resolve()
    try:
        parts = parts_for_roles(roles)
    except StageWeightsError as exc:
        raise ModelLoadError(str(exc)) from exc

    import torch
    import transformers
    from transformers import AutoTokenizer

    from services.engine.attention import register_paged_attention
    from services.models.encoder_dtype import set_encoder_dtype
    from services.models.packed_linear import MODES, pack_linears
    from services.models.patch_embed import use_linear_patch_embed

    if linear_backend not in MODES:
        raise ModelLoadError(f"linear backend must be one of {', '.join(MODES)}, got {linear_backend!r}")

    reference = attention is not None  # transformers' stock modules, as the oracle tests want them
    if attention is None:
        attention = register_paged_attention()
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    if device.startswith("npu"):
        import torch_npu  # noqa: F401  (registers the device; only when asked for)
    cls = family_class(model_type)
    attn = {"text_config": attention, cls.encoder_config: "sdpa", "": "sdpa"}
    auto_class = getattr(transformers, cls.auto_class)
    if parts == {VISION, TEXT}:
        model = auto_class.from_pretrained(folder, dtype=torch_dtype, attn_implementation=attn)
        model.to(device).eval()
    else:
        try:
            model = load_parts(
                folder, parts, part_modules=cls.part_modules, renames=cls.checkpoint_renames,
                dtype=torch_dtype, device=device, attn_implementation=attn, auto_class=auto_class,
            )  # fmt: skip
        except StageWeightsError as exc:
            raise ModelLoadError(f"cannot load {folder} for roles {roles}: {exc}") from exc
    if not reference:
        use_linear_patch_embed(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    family = cls(model, cls.load_image_processor(str(folder)), read_video_config(folder))
    if encoder_dtype:
        set_encoder_dtype(family, encoder_dtype)
    if not reference and device == "cpu":
        pack_linears(model, linear_backend)
    return LoadedModel(folder, model_type, family, tokenizer, _eos_ids(folder, tokenizer), parts)
