"""Qwen2-Audio placeholder counts without torch: how many `<|AUDIO|>` tokens a clip expands to.

The gateway expands each audio placeholder (and checks the prompt's length) before any encoder sees
the clip, so it needs the count from the number of 16 kHz samples alone. Two steps decide it:

1. Whisper's feature extractor pads or cuts every clip to `n_samples` (30 s), computes one log-mel
   frame per `hop_length` samples, and marks the frames that hold real audio in the attention mask.
   Qwen2AudioProcessor always calls it with `padding="max_length"` and truncation on, so the mask
   counts `ceil(min(n, n_samples) / hop_length)` frames (one fewer at most when `n_samples` is not a
   multiple of `hop_length`, where transformers drops the last mask entry).
2. The audio tower's two stride-2 steps (the second conv, then the pooling) turn L frames into
   `((L - 1) // 2 + 1 - 2) // 2 + 1` tokens: `_get_feat_extract_output_lengths` in transformers.

Tests compare both with transformers' own processor and model code. Only the standard library is
imported here; keep it that way (the gateway imports this).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.vision_geometry import PREPROCESSOR_CONFIG

# WhisperFeatureExtractor's defaults, which Qwen2-Audio checkpoints use unchanged.
DEFAULT_SAMPLING_RATE = 16_000
DEFAULT_HOP_LENGTH = 160
DEFAULT_CHUNK_LENGTH = 30
DEFAULT_N_SAMPLES = DEFAULT_CHUNK_LENGTH * DEFAULT_SAMPLING_RATE


def whisper_num_frames(
    num_samples: int, *, hop_length: int = DEFAULT_HOP_LENGTH, n_samples: int = DEFAULT_N_SAMPLES
) -> int:
    """The sum of the `feature_attention_mask` Whisper's extractor returns for `num_samples` samples.

    Mirrors `padding="max_length"` with truncation: longer clips count as `n_samples`; the mask is
    the sample mask taken every `hop_length` samples, minus its last entry when `n_samples` is not a
    multiple of `hop_length`.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    kept = min(num_samples, n_samples)
    return min(-(-kept // hop_length), n_samples // hop_length)


def qwen2_audio_num_tokens(num_frames: int) -> int:
    """Encoder outputs (placeholder tokens) for `num_frames` unpadded feature frames.

    The formula is the model's `_get_feat_extract_output_lengths`; fewer than 3 frames give 0 tokens,
    which the caller should refuse rather than send an audio part with no placeholders.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@dataclass(frozen=True, slots=True)
class AudioGeometry:
    """The feature-extractor settings that decide the token count, read from a checkpoint."""

    sampling_rate: int = DEFAULT_SAMPLING_RATE
    hop_length: int = DEFAULT_HOP_LENGTH
    n_samples: int = DEFAULT_N_SAMPLES

    def __post_init__(self) -> None:
        if min(self.sampling_rate, self.hop_length, self.n_samples) <= 0:
            raise ValueError(f"audio feature settings must be positive, got {self}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> AudioGeometry:
        """Accept a saved `WhisperFeatureExtractor` config; `n_samples` is derived when left out.

        The extractor itself computes `n_samples = chunk_length * sampling_rate`, so a config that
        has only `chunk_length` gives the same window.
        """
        rate = int(config.get("sampling_rate") or DEFAULT_SAMPLING_RATE)
        chunk = int(config.get("chunk_length") or DEFAULT_CHUNK_LENGTH)
        return cls(
            sampling_rate=rate,
            hop_length=int(config.get("hop_length") or DEFAULT_HOP_LENGTH),
            n_samples=int(config.get("n_samples") or chunk * rate),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> AudioGeometry:
        """Read `preprocessor_config.json` from a checkpoint folder (or that file's own path)."""
        path = Path(path)
        if path.is_dir():
            path = path / PREPROCESSOR_CONFIG
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    @property
    def max_seconds(self) -> float:
        """The window the extractor keeps; anything longer is cut, so longer audio buys nothing."""
        return self.n_samples / self.sampling_rate

    def num_frames(self, num_samples: int) -> int:
        """Unpadded feature frames for a clip of `num_samples` samples at `sampling_rate`."""
        return whisper_num_frames(num_samples, hop_length=self.hop_length, n_samples=self.n_samples)

    def num_tokens(self, num_samples: int) -> int:
        """How many `<|AUDIO|>` tokens a clip of `num_samples` samples at `sampling_rate` expands to."""
        return qwen2_audio_num_tokens(self.num_frames(num_samples))
