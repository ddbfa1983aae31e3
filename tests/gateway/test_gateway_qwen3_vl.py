"""A Qwen3-VL checkpoint at the gateway: image placeholders counted with its 16-pixel patches (read from
its preprocessor config, no torch), and video prompts rendered as `Qwen3VLProcessor` renders them
(its frame sampling and resize rule, a timestamp and a run of pads per temporal patch)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from gateway_helpers import chat_body, data_uri, image_part, png

from common.tokenizer import TextTokenizer
from common.vision_geometry import VisionGeometry
from gateway.config import GatewayConfig
from gateway.openai_api import ChatCompletionRequest, decode_body
from gateway.preprocess import Preprocessor
from tests.qwen3_vl_helpers import processor_prompt_ids, processor_video
from tests.reference import make_image
from tests.video_helpers import make_video

QUESTION = "What happens in the video?"


def _request(content) -> ChatCompletionRequest:
    return decode_body(json.dumps(chat_body(content, max_tokens=3)).encode(), ChatCompletionRequest)


def video_part(data: bytes) -> dict:
    return {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()},
    }


@pytest.fixture(scope="module")
def preprocessor(tiny_qwen3_vl):
    return Preprocessor(GatewayConfig(model_dir=tiny_qwen3_vl), TextTokenizer.from_dir(tiny_qwen3_vl))


def test_image_tokens_follow_the_16_pixel_patches(preprocessor, tiny_qwen3_vl) -> None:
    geometry = VisionGeometry.from_dir(tiny_qwen3_vl)
    assert geometry.patch_size == 16
    request = preprocessor.chat(_request([image_part(data_uri(png(200, 120)))]), "chatcmpl-1", 4096)
    (image,) = request.images
    assert image.grid_thw == geometry.grid(200, 120) and image.grid_thw[1] * 16 == 128  # 120 -> 128 px
    assert request.token_ids.count(preprocessor.image_token_id) == image.num_tokens


@pytest.mark.parametrize(
    ("count", "width", "height", "fps"),
    [(8, 56, 56, 8), (30, 96, 64, 10), (7, 64, 40, 3)],  # 4 frames of 8; 6 of 30; 7 (an odd count) of 7
)
def test_video_prompt_ids_equal_the_processors(preprocessor, tiny_qwen3_vl, count, width, height, fps):
    video = make_video(count, width, height, fps)
    request = preprocessor.chat(_request([video_part(video), {"type": "text", "text": QUESTION}]), "c", 8192)
    assert request.token_ids == processor_prompt_ids(tiny_qwen3_vl, QUESTION, [("video", video)])
    (item,) = request.images
    indices, grid, _ = processor_video(tiny_qwen3_vl, video)
    assert item.grid_thw == grid and item.num_tokens == grid[0] * grid[1] * grid[2] // 4
    assert len(item.timestamps) == grid[0]


def test_video_and_image_prompt_ids_equal_the_processors(preprocessor, tiny_qwen3_vl):
    video, image = make_video(10, 64, 96, 5, seed=2), make_image(84, 56, seed=5)
    content = [video_part(video), image_part(data_uri(png_of(image))), {"type": "text", "text": QUESTION}]
    request = preprocessor.chat(_request(content), "c", 8192)
    expected = processor_prompt_ids(tiny_qwen3_vl, QUESTION, [("video", video), ("image", image)])
    assert request.token_ids == expected
    assert [i.kind for i in request.images] == ["video", "image"]


def png_of(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
