"""Small test videos, encoded in memory with PyAV, and the items our pipeline makes of them.

`video_item` runs the serving path's own steps (decode with the checkpoint's sampling, resize, pad,
patchify) and is what the fidelity tests hand to transformers' `generate` as `pixel_values_videos`:
transformers' video processor cannot run here (it needs torchvision), so the reference gets the
pixels from the documented formula with the gateway's frame plan.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from common.video import decode_video, prepare_video, probe_video
from common.video_plan import VideoPlan, plan_video


def make_frames(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients plus a little noise: compressible, and every frame different."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, ..., 0] = (x * 255 // max(width - 1, 1) + 11 * i) % 256
        frames[i, ..., 1] = (y * 200 // max(height - 1, 1) + 20 + 7 * seed) % 256
        frames[i, ..., 2] = (37 * i + 50 * seed) % 200 + 30
    noise = rng.integers(-8, 9, frames.shape)
    return np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_video(count: int = 8, width: int = 56, height: int = 56, fps: int = 8, seed: int = 0) -> bytes:
    """An H.264 MP4 of `count` frames at `fps` (8 frames of 56 x 56 at 8 fps: about 3 KB)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = height, width
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for frame in make_frames(count, width, height, seed):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def video_item(family, data: bytes) -> tuple[object, VideoPlan]:
    """The encoder's input for `data` under the checkpoint's sampling, and the gateway's plan of it."""
    sampling = family.video_sampling
    plan = plan_video(probe_video(data), sampling)
    prepared = prepare_video(decode_video(data, sampling=sampling), sampling)
    assert prepared.grid_thw == plan.grid_thw and prepared.num_tokens == plan.num_tokens
    assert prepared.second_per_grid_t == plan.second_per_grid_t
    return family.preprocess_video(prepared), plan
