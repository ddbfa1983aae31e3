"""The tiny Qwen3-VL checkpoint: the files a downloaded model has, loadable by transformers' own
`from_pretrained`, its chat template rendering image and video parts, and its geometry (16-pixel
patches, two DeepStack levels feeding a three-layer text model, interleaved M-RoPE)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from common.qwen3_vl_video import frame_timestamps, video_placeholder_text
from common.video_sampling import VideoSampling
from services.models import tiny
from services.models.tiny_qwen3_vl import interleaved_mrope_section


def test_files_config_and_processors(tiny_qwen3_vl: Path) -> None:
    path = tiny_qwen3_vl
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    } <= names
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["vision_config"]["patch_size"] == 16
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    assert config["text_config"]["num_hidden_layers"] == 3  # one layer past the DeepStack levels
    rope = config["text_config"]["rope_parameters"]
    assert rope["mrope_interleaved"] and rope["mrope_section"] == interleaved_mrope_section(16) == [4, 2, 2]
    assert all(3 * n <= 64 for n in interleaved_mrope_section(128)[1:])  # fits head_dim 128
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil" and processor.patch_size == 16
    video = json.loads((path / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert VideoSampling.from_config(video).patch_size == 16
    assert json.loads((path / tiny.MARKER_FILE).read_text())["family"] == "qwen3_vl"


def test_loads_through_from_pretrained(tiny_qwen3_vl: Path) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert tiny.count_parameters(model) == tiny.parameter_count(tiny_qwen3_vl)


def test_chat_template_renders_image_and_video_parts(tiny_qwen3_vl: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_vl)
    content = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Same?"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    assert "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>" in text


def test_video_timestamps_as_the_processor_computes_them() -> None:
    # Qwen3VLProcessor._calculate_timestamps: frames padded to whole patches, the mean of each pair
    assert frame_timestamps([0, 4, 8, 12, 16], 8.0) == [0.25, 1.25, 2.0]
    assert frame_timestamps([0, 1], None) == [0.5 / 24]
    text = video_placeholder_text([0.25, 1.25], 2)
    assert text == (
        "<0.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
        "<1.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
    )
