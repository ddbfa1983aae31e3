"""The offline Qwen2-Audio checkpoint: the files a downloaded one has, loadable by transformers'
`from_pretrained` (model, processor, feature extractor), rebuilt byte for byte, with a chat template
that renders audio parts the way Qwen2-Audio's does."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, Qwen2AudioForConditionalGeneration

from common.audio_features import AudioGeometry
from services.models import tiny
from services.models.tiny_audio import NUM_MEL_BINS

EXPECTED_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "tiny_model.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_files_config_and_processor(tiny_qwen2_audio: Path) -> None:
    assert {p.name for p in tiny_qwen2_audio.iterdir()} == EXPECTED_FILES
    config = json.loads((tiny_qwen2_audio / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_audio)
    assert config["model_type"] == "qwen2_audio"
    assert config["audio_token_index"] == tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert config["text_config"]["vocab_size"] == len(tokenizer)
    assert "mrope_section" not in config["text_config"]["rope_parameters"]
    processor = AutoProcessor.from_pretrained(tiny_qwen2_audio)
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    assert processor.feature_extractor.feature_size == NUM_MEL_BINS
    assert AudioGeometry.from_dir(tiny_qwen2_audio) == AudioGeometry()  # 16 kHz, hop 160, 30 s
    messages = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Hi"}, {"type": "audio"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nHiAudio 2: <|audio_bos|><|AUDIO|>" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_loads_and_keeps_its_initializer(tiny_qwen2_audio: Path) -> None:
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio)
    assert tiny.count_parameters(model) == tiny.parameter_count(tiny_qwen2_audio)
    assert 250_000 < tiny.parameter_count(tiny_qwen2_audio) < 350_000
    assert 0.15 < model.lm_head.weight.std().item() < 0.25
    assert 0.15 < model.model.audio_tower.layers[0].fc1.weight.std().item() < 0.25


def test_rebuild_is_byte_identical(tiny_qwen2_audio: Path, tmp_path: Path) -> None:
    again = tiny.make_tiny_model("qwen2_audio", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (again / name).read_bytes() == (tiny_qwen2_audio / name).read_bytes(), name
