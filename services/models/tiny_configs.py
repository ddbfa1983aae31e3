"""Presets and transformers configs of the random-weight checkpoints that services/models/tiny.py builds.

Kept apart from the build and cache code because this is the part that decides what a checkpoint is
(sizes, token ids, rotary split); the builder only turns a config into saved files. Nothing here
imports torch or transformers at module level, so `FAMILIES` and `PRESETS` stay cheap to import.

`initializer_range` is far above the usual 0.02 on purpose: with 0.02 the logits are nearly flat and
greedy decoding repeats one token, so a wrong position id or a misplaced image feature would go
unnoticed. With the larger ranges below, such bugs change the generated tokens.

Changing a preset or the token names changes the files built: bump tiny.FORMAT_VERSION with it.
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2_audio", "qwen3_vl")
PRESETS = ("tiny", "small", "mid")

# Text: hidden size, layers, heads, kv_heads, ffn (intermediate size), max_pos, init (initializer_range).
# Vision: v_dim (width), v_depth, v_heads; Qwen2-VL's MLP is 4 x v_dim, Qwen2.5-VL's is the gated v_ffn,
# with full attention in the v_fullatt blocks and windowed attention in the others (as in the real
# model, one block in four or eight). min/max_pixels go to the image processor.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "max_pos": 4096, "init": 0.2,
        "v_dim": 32, "v_depth": 2, "v_heads": 2, "v_ffn": 96, "v_fullatt": [1],
        "min_pixels": 28 * 28 * 4, "max_pixels": 448 * 448,
    },
    "small": {
        "hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "ffn": 1408, "max_pos": 8192, "init": 0.05,
        "v_dim": 384, "v_depth": 4, "v_heads": 6, "v_ffn": 1024, "v_fullatt": [1, 3],
        "min_pixels": 28 * 28 * 4, "max_pixels": 448 * 448,
    },
    "mid": {
        "hidden": 1536, "layers": 8, "heads": 12, "kv_heads": 2, "ffn": 8960, "max_pos": 8192, "init": 0.05,
        "v_dim": 1280, "v_depth": 8, "v_heads": 16, "v_ffn": 3420, "v_fullatt": [3, 7],
        "min_pixels": 28 * 28 * 4, "max_pixels": 896 * 896,
    },
}  # fmt: skip

# Names match services.models.tiny_tokenizer, not imported here because it loads transformers.
_TOKENS = {
    "endoftext": "<|endoftext|>",
    "im_end": "<|im_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}


def _check(family: str, preset: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported families: {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; supported presets: {', '.join(PRESETS)}")


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in Qwen2-VL's 2:3:3 ratio.

    Qwen2-VL's real head_dim 128 gives [16, 24, 24]; the sections must sum to head_dim // 2.
    """
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(family: str, preset: str, tokenizer: Any) -> Any:
    """The transformers config for a family and preset, with token ids taken from `tokenizer`."""
    _check(family, preset)
    p = _PRESETS[preset]
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _TOKENS.items()}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": p["hidden"],
        "intermediate_size": p["ffn"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "max_position_embeddings": p["max_pos"],
        "max_window_layers": p["layers"],
        "initializer_range": p["init"],
        # transformers 5 keeps M-RoPE under rope_parameters with rope_type "default" ("mrope" is
        # rewritten to "default" on load); mrope_section is what switches the 3-axis split on.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": mrope_section(p["hidden"] // p["heads"]),
        },
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "pad_token_id": ids["endoftext"],
    }
    common_vision = {
        "depth": p["v_depth"],
        "num_heads": p["v_heads"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": p["init"],
    }
    top = {
        "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "pad_token_id": ids["endoftext"],
        "tie_word_embeddings": False,
        # Must be set on the outer config too: the composite model's weight init reads it there and
        # silently falls back to 0.02 for the language model otherwise.
        "initializer_range": p["init"],
    }
    if family == "qwen2_audio":
        from services.models.tiny_audio import build_audio_config

        text_config = {**text_config, "bos_token_id": top["bos_token_id"]}
        text_config.update(eos_token_id=top["eos_token_id"], pad_token_id=top["pad_token_id"])
        return build_audio_config(p, text_config, tokenizer, preset)
    if family == "qwen3_vl":
        from services.models.tiny_qwen3_vl import build_qwen3_vl_config

        return build_qwen3_vl_config(p, text_config, common_vision, top)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = {**common_vision, "embed_dim": p["v_dim"], "hidden_size": p["hidden"], "mlp_ratio": 4}
        return Qwen2VLConfig(text_config=text_config, vision_config=vision, **top)
    from transformers import Qwen2_5_VLConfig

    vision = {
        **common_vision,
        "hidden_size": p["v_dim"],
        "intermediate_size": p["v_ffn"],
        "out_hidden_size": p["hidden"],
        "window_size": 112,  # pixels: 112 / 14 / 2 = windows of 4x4 merged tokens, as in the real model
        "fullatt_block_indexes": list(p["v_fullatt"]),
    }
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision, **top)
