"""Qwen3-VL prompts as transformers renders them, for comparing the gateway's token ids.

`Qwen3VLProcessor` cannot be built here (its video processor needs torchvision), so the prompt is built
by the processor's own text rule (`replace_video_token`, read from its source) from transformers' own
pieces: the frames `Qwen3VLVideoProcessor.sample_frames` picks (called unbound on the checkpoint's
settings), the size its `smart_resize` gives, the times `Qwen3VLProcessor._calculate_timestamps`
computes, the image grid from the checkpoint's image processor, and the whole text tokenized at once.
The video's metadata is read as transformers' PyAV reader does (`stream.frames`, `average_rate`).
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import av
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
from transformers.video_utils import VideoMetadata

from common.prompting import mm_message


def processor_video(checkpoint, data: bytes) -> tuple[list[int], tuple[int, int, int], str]:
    """transformers' sampled indices, `video_grid_thw` and placeholder text for one video."""
    cfg = json.loads((Path(checkpoint) / "video_preprocessor_config.json").read_text())
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        total, fps = stream.frames, float(stream.average_rate)
        first = next(container.decode(video=0))
        height, width = first.height, first.width
    stub = SimpleNamespace(fps=cfg["fps"], min_frames=cfg["min_frames"], max_frames=cfg["max_frames"])
    indices = Qwen3VLVideoProcessor.sample_frames(stub, VideoMetadata(total_num_frames=total, fps=fps))
    indices = [int(i) for i in indices]
    patch, merge, tps = cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]
    h, w = smart_resize(
        num_frames=len(indices), height=height, width=width, temporal_factor=tps, factor=patch * merge,
        min_pixels=cfg["size"]["shortest_edge"], max_pixels=cfg["size"]["longest_edge"],
    )  # fmt: skip
    grid = (math.ceil(len(indices) / tps), h // patch, w // patch)
    stamps = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, tps)
    per_patch = grid[1] * grid[2] // merge**2
    text = "".join(
        f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_patch + "<|vision_end|>" for t in stamps
    )
    return indices, grid, text


def processor_prompt_ids(checkpoint, question: str, parts: list[tuple[str, object]]) -> list[int]:
    """The ids `Qwen3VLProcessor(text=chat, images=..., videos=...)` gives: `parts` are ("video", bytes)
    or ("image", PIL image) in prompt order."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    images = AutoImageProcessor.from_pretrained(checkpoint)
    chat = tokenizer.apply_chat_template(
        mm_message(question, [k for k, _ in parts]), add_generation_prompt=True, tokenize=False
    )
    runs = []
    for kind, value in parts:
        if kind == "video":
            runs.append(processor_video(checkpoint, value)[2])
        else:
            grid = images(images=[value])["image_grid_thw"][0]
            runs.append("<|image_pad|>" * (int(grid[0] * grid[1] * grid[2]) // images.merge_size**2))
    pieces = re.split(r"<\|image_pad\|>|<\|video_pad\|>", chat)
    assert len(pieces) == len(runs) + 1
    text = pieces[0] + "".join(r + p for r, p in zip(runs, pieces[1:], strict=True))
    return tokenizer(text)["input_ids"]
