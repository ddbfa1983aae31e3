"""Request preprocessing without HTTP: defaults from the checkpoint and the order of the checks."""

from __future__ import annotations

import json
import shutil

import pytest
from gateway_helpers import chat_body, data_uri, image_part, png

from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.openai_api import ChatCompletionRequest, decode_body
from gateway.preprocess import Preprocessor


def _request(**fields) -> ChatCompletionRequest:
    return decode_body(json.dumps(chat_body(**fields)).encode(), ChatCompletionRequest)


def test_generation_config_supplies_sampling_defaults(model_dir, tokenizer, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    generation = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    preprocessor = Preprocessor(GatewayConfig(model_dir=folder), tokenizer)
    params = preprocessor.chat(_request(max_tokens=3), "chatcmpl-1", 4096).params
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.8, 20)
    params = preprocessor.chat(_request(max_tokens=3, temperature=0, top_k=0), "chatcmpl-2", 4096).params
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.8, 0)


def test_cheap_field_checks_come_before_any_image_is_decoded(model_dir, tokenizer) -> None:
    preprocessor = Preprocessor(GatewayConfig(model_dir=model_dir, max_image_pixels=100), tokenizer)
    request = _request(content=[image_part(data_uri(png()))], temperature=-1)
    with pytest.raises(ApiError, match="temperature") as caught:
        preprocessor.chat(request, "chatcmpl-3", 4096)
    assert caught.value.param == "temperature"
