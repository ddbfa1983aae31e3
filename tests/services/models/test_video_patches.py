"""`pixel_values_videos` without torchvision: the patch layout is transformers' own `patchify` (its
source, run unchanged), the scaling its fused rescale-and-normalize, and a still video equals the image
processor's patches of that picture (the image path the fidelity tests already trust)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil

from services.models.video_patches import VideoNormalization, normalize_frames, patchify, video_pixel_values


def transformers_patchify():
    """`Qwen2VLVideoProcessor.patchify` from the installed source (the module imports torchvision)."""
    spec = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    source = Path(spec.origin).read_text(encoding="utf-8")
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    node = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    namespace = {"torch": torch}
    exec(ast.get_source_segment(source, node, padded=False), namespace)  # noqa: S102
    return namespace["patchify"]


@pytest.mark.parametrize(("frames", "height", "width"), [(4, 56, 84), (3, 112, 56), (1, 28, 28)])
def test_patchify_is_transformers_patchify(frames, height, width):
    videos = torch.randn(frames, 3, height, width, generator=torch.Generator().manual_seed(frames))
    ours, grid = patchify(videos, 14, 2, 2)
    theirs, t, h, w = transformers_patchify()(None, videos[None], 14, 2, 2)
    assert grid == (t, h, w) == (-(-frames // 2), height // 14, width // 14)
    assert torch.equal(ours, theirs[0])


def test_normalization_is_the_fused_formula():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    norm = VideoNormalization()
    ours = normalize_frames(frames, norm)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    mean = torch.tensor(norm.image_mean) * (1.0 / norm.rescale_factor)
    std = torch.tensor(norm.image_std) * (1.0 / norm.rescale_factor)
    assert torch.equal(ours, (x - mean[:, None, None]) / std[:, None, None])
    unfused = (x * norm.rescale_factor - torch.tensor(norm.image_mean)[:, None, None]) / torch.tensor(
        norm.image_std
    )[:, None, None]
    assert torch.allclose(ours, unfused, atol=1e-5)


def test_a_still_video_equals_the_image_processors_patches():
    """Two equal frames fill one temporal patch, as the image processor repeats a picture."""
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448)
    image = processor(images=[frame], return_tensors="pt")
    pixels, grid = video_pixel_values(np.stack([frame, frame]), VideoNormalization.of({}, processor))
    assert grid == tuple(int(v) for v in image["image_grid_thw"][0]) == (1, 4, 6)
    assert torch.allclose(pixels, image["pixel_values"], atol=1e-5)


def test_normalization_reads_the_video_config_then_the_image_processor():
    processor = Qwen2VLImageProcessorPil(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    assert VideoNormalization.of({}, processor).image_mean == (0.5, 0.5, 0.5)
    config = {"image_mean": [0.1, 0.2, 0.3], "rescale_factor": 0.5}
    norm = VideoNormalization.of(config, processor)
    assert norm.image_mean == (0.1, 0.2, 0.3) and norm.image_std == (0.25,) * 3 and norm.rescale_factor == 0.5
