"""Qwen2-VL video frames to `pixel_values_videos`: what transformers' `Qwen2VLVideoProcessor` does after
resizing, re-implemented because that class imports torchvision, which this project does not install.

Two steps, each the processor's own arithmetic (tests/services/models/test_video_patches.py runs its
`patchify` source against this):
  - rescale and normalize, fused as transformers fuses them (`_fuse_mean_std_and_rescale_factor`):
    `(x - mean / rescale_factor) / (std / rescale_factor)` in float32, on the uint8 frames;
  - patchify: frames padded to whole temporal patches (the last one repeated), cut into
    temporal_patch_size x patch_size x patch_size blocks, ordered so that each merge_size x
    merge_size group of patches is contiguous (the order the vision tower's merger expects).
The frames come resized (common.video.prepare_video); the grid is (frames / tps, h / patch, w / patch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.video_sampling import VIDEO_PREPROCESSOR_CONFIG

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, slots=True)
class VideoNormalization:
    """The video processor's pixel scaling; a missing config keeps the image processor's values."""

    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def of(cls, config: dict[str, Any], image_processor: Any = None) -> VideoNormalization:
        def pick(name: str, default: Any) -> Any:
            value = config.get(name)
            if value is None and image_processor is not None:
                value = getattr(image_processor, name, None)
            return default if value is None else value

        return cls(
            image_mean=tuple(float(v) for v in pick("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(float(v) for v in pick("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(pick("rescale_factor", 1 / 255)),
        )


def read_video_config(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's `video_preprocessor_config.json`, or {} when it has none (Qwen defaults)."""
    path = Path(folder) / VIDEO_PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    return config if isinstance(config, dict) else {}


def normalize_frames(frames: np.ndarray, norm: VideoNormalization) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W], rescaled and normalized with transformers' fusion."""
    videos = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    mean = torch.tensor(norm.image_mean) * (1.0 / norm.rescale_factor)
    std = torch.tensor(norm.image_std) * (1.0 / norm.rescale_factor)
    return (videos.to(torch.float32) - mean[:, None, None]) / std[:, None, None]


def patchify(
    videos: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """float [T, C, H, W] -> ([t*h*w, C*tps*patch*patch], (t, h, w)), the processor's `patchify`."""
    num_frames, channel, height, width = videos.shape
    if pad := -num_frames % temporal_patch_size:
        videos = torch.cat((videos, videos[-1:].expand(pad, -1, -1, -1)))
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    patches = videos.reshape(
        grid_t,
        temporal_patch_size,
        channel,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return flat, (grid_t, grid_h, grid_w)


def video_pixel_values(
    frames: np.ndarray,
    norm: VideoNormalization,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resized uint8 frames [T, H, W, 3] -> `pixel_values_videos` rows of one video and its grid."""
    return patchify(normalize_frames(frames, norm), patch_size, merge_size, temporal_patch_size)
