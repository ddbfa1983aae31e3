"""The Qwen3-VL parts of the offline tiny checkpoints: config and video processor settings.

Kept apart from services/models/tiny.py (which builds and saves every family) because Qwen3-VL differs
from Qwen2-VL in what the tests must exercise:
  - the vision tower has 16-pixel patches (32-pixel merged tokens) and a learned position grid
    (`num_position_embeddings`, a square, resampled to each image's grid);
  - DeepStack: the tower emits extra merged features at the blocks `deepstack_visual_indexes` names,
    and the language model adds level `k` to the visual rows after its layer `k`. The tiny text model
    has one layer more than there are levels, so a runner that added features at every layer, or at
    the wrong ones, would change the tokens;
  - interleaved M-RoPE (`mrope_interleaved`, sections that pick every third frequency), so the
    sections are sized for the interleaved layout: 3 * h and 3 * w must fit in head_dim / 2.

The tokenizer and chat template are the vision families' (the same `<|vision_start|>`,
`<|image_pad|>`, `<|video_pad|>`, `<|vision_end|>` tokens and image and video parts). The image
processor is `Qwen2VLImageProcessorPil` with patch size 16, which is what transformers maps
`qwen3_vl` to without torchvision. The video processor (`Qwen3VLVideoProcessor`) needs torchvision
to be built, so its settings are written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATCH_SIZE = 16  # Qwen3-VL's vision patch, in pixels (Qwen2-VL's is 14)
DEEPSTACK_LEVELS = 2  # how many vision blocks feed DeepStack features to the language model


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) frequency counts for interleaved M-RoPE (the real model, head_dim 128, uses [24, 20, 20]).

    Interleaved sections take frequencies 1, 4, 7, ... for h and 2, 5, 8, ... for w (up to 3 * h and
    3 * w), and time keeps the rest, so h and w must each be at most a third of head_dim / 2.
    """
    half = head_dim // 2
    hw = half // 3
    return [half - 2 * hw, hw, hw]


def build_qwen3_vl_config(
    preset: dict[str, Any], text_config: dict[str, Any], vision: dict[str, Any], top: dict[str, Any]
) -> Any:
    """Qwen3VLConfig from tiny_configs.py's shared preset, text and vision settings and top token ids."""
    from transformers import Qwen3VLConfig

    head_dim = preset["hidden"] // preset["heads"]
    text = {**text_config, "head_dim": head_dim, "num_hidden_layers": DEEPSTACK_LEVELS + 1}
    text.pop("max_window_layers", None)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": interleaved_mrope_section(head_dim),
        "mrope_interleaved": True,
    }
    depth = max(vision["depth"], DEEPSTACK_LEVELS + 1)
    vision_config = {
        **vision,
        "depth": depth,
        "patch_size": PATCH_SIZE,
        "hidden_size": preset["v_dim"],
        "intermediate_size": preset["v_ffn"],
        "out_hidden_size": preset["hidden"],
        "num_position_embeddings": 256,  # a 16 x 16 learned grid
        # blocks 0 .. levels-1 (not the last one, whose output is the main features)
        "deepstack_visual_indexes": list(range(DEEPSTACK_LEVELS)),
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision_config, **top)


def save_qwen3_vl_video_config(folder: Path, image_processor: Any, preset: dict[str, Any]) -> None:
    """`Qwen3VLVideoProcessor`'s settings, small frames (a quarter of the image budget) for fast tests."""
    config = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "do_sample_frames": True, "fps": 2, "min_frames": 4, "max_frames": 64,
        "size": {"shortest_edge": preset["min_pixels"], "longest_edge": preset["max_pixels"] // 4},
        "patch_size": PATCH_SIZE, "temporal_patch_size": 2, "merge_size": 2,
        "do_rescale": True, "rescale_factor": image_processor.rescale_factor,
        "do_normalize": True, "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std), "resample": 3,
    }  # fmt: skip
    (folder / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
