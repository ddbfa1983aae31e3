"""Qwen3-VL's video prompt text without torch: a timestamp before each temporal patch's tokens.

Qwen3-VL gives time to the model through the prompt, not through M-RoPE: `Qwen3VLProcessor` replaces a
video's `<|video_pad|>` by, for each temporal patch, `<{seconds:.1f} seconds>` followed by
`<|vision_start|>`, the patch's placeholder tokens and `<|vision_end|>` (transformers 5 replaces only the
pad token, so the chat template's own `<|vision_start|>` and `<|vision_end|>` stay around the whole
run). A patch's time is the mean of the times of its first and last sampled frame, the frame list being
padded with its last frame to whole temporal patches, exactly as `Qwen3VLProcessor._calculate_timestamps`.
Because the prompt's text depends on the sampled frames' times, whoever tokenizes the prompt must
render it; this module is plain Python so that the gateway can, and the tests use it to build the same
prompts transformers' processor would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DEFAULT_FPS = 24.0  # what the processor assumes when a video's frame rate is unknown


def frame_timestamps(
    indices: Sequence[int], video_fps: float | None, temporal_patch_size: int = 2
) -> list[float]:
    """Seconds of each temporal patch of a video whose sampled frames are `indices`."""
    fps = DEFAULT_FPS if video_fps is None else float(video_fps)
    padded = list(indices)
    if len(padded) % temporal_patch_size:
        padded += [padded[-1]] * (temporal_patch_size - len(padded) % temporal_patch_size)
    times = [i / fps for i in padded]
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)
    ]


def video_placeholder_text(
    timestamps: Sequence[float],
    tokens_per_patch: int,
    *,
    video_token: str = "<|video_pad|>",
    vision_start: str = "<|vision_start|>",
    vision_end: str = "<|vision_end|>",
) -> str:
    """What one video's `<|video_pad|>` becomes in the prompt text, one timestamped run per patch."""
    return "".join(
        f"<{t:.1f} seconds>{vision_start}{video_token * tokens_per_patch}{vision_end}" for t in timestamps
    )


def video_prompt_ids(
    encode: Callable[[str], list[int]],
    timestamps: Sequence[float],
    tokens_per_patch: int,
    video_token_id: int,
    vision_start_id: int,
    vision_end_id: int,
) -> list[int]:
    """Token ids of `video_placeholder_text`: each timestamp is text between two special tokens, so it
    tokenizes alone exactly as inside the whole prompt (`encode` takes text, adds no special tokens)."""
    out: list[int] = []
    for t in timestamps:
        out += encode(f"<{t:.1f} seconds>")
        out += [vision_start_id, *[video_token_id] * tokens_per_patch, vision_end_id]
    return out
