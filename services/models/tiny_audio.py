"""The Qwen2-Audio parts of the offline tiny checkpoints: config, feature extractor and processor.

Kept apart from services/models/tiny.py and tiny_configs.py (the build, the vision families) because an audio
checkpoint differs in every file but the weights' format: a Whisper-style encoder config, a
`WhisperFeatureExtractor` as `preprocessor_config.json` (128 mel bins, 16 kHz, 30 s windows: Qwen2-Audio's
settings), a tokenizer with the three audio tokens, and a `Qwen2AudioProcessor` whose chat template
renders audio parts, so `AutoProcessor.from_pretrained` works on the folder as on a downloaded model.

The encoder keeps the real model's time geometry (`max_source_positions` 1500, so 3000 mel frames
per clip: transformers refuses any other length) and shrinks only its width and depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Encoder width, layers, heads, ffn for each preset (the text side comes from tiny_configs.py's presets).
AUDIO_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"a_dim": 32, "a_layers": 2, "a_heads": 2, "a_ffn": 64},
    "small": {"a_dim": 256, "a_layers": 4, "a_heads": 4, "a_ffn": 1024},
    "mid": {"a_dim": 1280, "a_layers": 8, "a_heads": 20, "a_ffn": 5120},
}
NUM_MEL_BINS = 128  # Qwen2-Audio's (Whisper large-v3's); WhisperFeatureExtractor's default is 80


def build_audio_config(preset: dict[str, Any], text_config: dict[str, Any], tokenizer: Any, name: str) -> Any:
    """Qwen2AudioConfig with a plain (1-D) RoPE text model and the audio token id from `tokenizer`."""
    from transformers import Qwen2AudioConfig

    from services.models.tiny_tokenizer import AUDIO

    a = AUDIO_PRESETS[name]
    text = {**text_config, "model_type": "qwen2"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}  # no M-RoPE sections
    audio = {
        "d_model": a["a_dim"],
        "encoder_layers": a["a_layers"],
        "encoder_attention_heads": a["a_heads"],
        "encoder_ffn_dim": a["a_ffn"],
        "num_mel_bins": NUM_MEL_BINS,
        "max_source_positions": 1500,
        "initializer_range": preset["init"],
    }
    return Qwen2AudioConfig(
        audio_config=audio,
        text_config=text,
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
        # the composite model's weight init reads it here (see tiny_configs.py)
        initializer_range=preset["init"],
        tie_word_embeddings=False,
        bos_token_id=text_config["bos_token_id"],
        eos_token_id=text_config["eos_token_id"],
        pad_token_id=text_config["pad_token_id"],
    )


def save_audio_processor(folder: Path, tokenizer: Any) -> None:
    """`preprocessor_config.json` (the feature extractor), the processor config and its chat template."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=NUM_MEL_BINS)
    processor = Qwen2AudioProcessor(
        feature_extractor=extractor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    processor.save_pretrained(folder)
    # transformers 5 folds the extractor into processor_config.json; the gateway (and older loaders)
    # read it from preprocessor_config.json, so it is written there too.
    extractor.save_pretrained(folder)
