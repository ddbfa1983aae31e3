"""A Qwen3-VL checkpoint at the gateway: image placeholders counted with its 16-pixel patches (read from
its preprocessor config, no torch), and videos refused until their timestamped prompts are rendered."""

from __future__ import annotations

import json

import pytest
from gateway_helpers import chat_body, data_uri, image_part, png

from common.tokenizer import TextTokenizer
from common.vision_geometry import VisionGeometry
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.openai_api import ChatCompletionRequest, decode_body
from gateway.preprocess import Preprocessor


def _request(content) -> ChatCompletionRequest:
    return decode_body(json.dumps(chat_body(content, max_tokens=3)).encode(), ChatCompletionRequest)


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


def test_videos_are_refused_not_served_without_timestamps(preprocessor) -> None:
    part = {"type": "video_url", "video_url": {"url": data_uri(b"\0" * 64, "video/mp4")}}
    with pytest.raises(ApiError, match="does not take videos"):
        preprocessor.chat(_request([part]), "chatcmpl-2", 4096)
