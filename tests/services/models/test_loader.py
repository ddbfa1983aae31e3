"""The loader refuses what it cannot serve, with a message that says why, before reading weights."""

from __future__ import annotations

import json
import shutil

import pytest

from services.models.loader import ModelLoadError, load_model, read_model_type


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_a_file_is_not_a_folder(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(f)


def test_folder_without_config_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(tmp_path)


def test_unsupported_family_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match=r"'llama' .* not supported; supported: qwen2_vl, qwen2_5_vl"):
        load_model(tmp_path)


def test_checkpoint_without_weights(tmp_path, tiny_qwen2_vl):
    shutil.copy(tiny_qwen2_vl / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl", "tiny_qwen2_5_vl"])
def test_real_checkpoints_load_with_their_family(fixture, request):
    path = request.getfixturevalue(fixture)
    model_type = read_model_type(path)
    loaded = load_model(path)
    assert loaded.model_type == model_type == fixture.removeprefix("tiny_")
    assert loaded.family.image_token_id == loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert loaded.eos_token_ids, "EOS ids come from generation_config.json and the tokenizer"
