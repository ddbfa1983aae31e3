"""Offline tiny checkpoints: they load through transformers' Auto classes, rebuild byte for byte, and
generate with and without an image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from services.models import tiny
from services.models.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer

EXPECTED_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tiny_model.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
}


# audio: test_tiny_audio.py, qwen3_vl: test_tiny_qwen3_vl.py
@pytest.fixture(params=[f for f in tiny.FAMILIES if f not in ("qwen2_audio", "qwen3_vl")])
def checkpoint(request, tiny_qwen2_vl: Path, tiny_qwen2_5_vl: Path) -> tuple[str, Path]:
    return request.param, {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[request.param]


def _image(seed: int, size: tuple[int, int] = (200, 120)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _image_inputs(model_dir: Path, image: Image.Image, text: str = "What is this?") -> dict:
    """Prompt with one image, its placeholder expanded, the way the serving stages build it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    pixels = processor(images=[image], return_tensors="pt")
    n = int(pixels["image_grid_thw"][0].prod()) // processor.merge_size**2
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(prompt.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_id).sum()) == n
    return {**enc, **pixels, "mm_token_type_ids": (enc["input_ids"] == image_id).long()}


def test_checkpoint_files_and_config(checkpoint: tuple[str, Path]) -> None:
    family, path = checkpoint
    assert {p.name for p in path.iterdir()} == EXPECTED_FILES
    config = json.loads((path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config["model_type"] == family
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config["text_config"]["vocab_size"] == len(tokenizer)
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    ]
    assert json.loads((path / tiny.MARKER_FILE).read_text())["family"] == family


def test_loads_through_auto_classes(checkpoint: tuple[str, Path]) -> None:
    family, path = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.model_type == family
    assert model.dtype == torch.float32
    assert tiny.count_parameters(model) == tiny.parameter_count(path)
    assert 250_000 < tiny.parameter_count(path) < 350_000
    # the large initializer range is what makes position bugs visible: check it survived
    assert model.lm_head.weight.std().item() == pytest.approx(0.2, rel=0.1)
    processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (28 * 28 * 4, 448 * 448)


def test_generate_text_and_image(checkpoint: tuple[str, Path]) -> None:
    _, path = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe a red circle."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**text, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > text["input_ids"].shape[1]

    inputs = _image_inputs(path, _image(0))
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    # the image must matter: another image of the same size changes the next-token logits
    other = _image_inputs(path, _image(1))
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**other).logits[0, -1]
    assert (a - b).abs().max().item() > 1e-3


def test_rebuild_is_byte_identical(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    again = tiny.make_tiny_model("qwen2_vl", tmp_path / "again", preset="tiny", seed=0)
    for name in EXPECTED_FILES:
        assert (again / name).read_bytes() == (tiny_qwen2_vl / name).read_bytes(), name
    other = tiny.make_tiny_model("qwen2_vl", tmp_path / "seed1", preset="tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_seeding_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.make_tiny_model("qwen2_vl", tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_family_or_preset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl"):
        tiny.make_tiny_model("llama", tmp_path / "x")
    with pytest.raises(ValueError, match="tiny, small, mid"):
        tiny.make_tiny_model("qwen2_vl", tmp_path / "x", preset="huge")
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_dir_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.make_tiny_model("qwen2_vl", out)
    tiny.make_tiny_model("qwen2_vl", out, overwrite=True)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_ensure_tiny_model_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPD_SERVE_CACHE", str(tmp_path))
    path = tiny.ensure_tiny_model("qwen2_5_vl")
    assert path == tmp_path / "models" / "qwen2_5_vl-tiny"
    assert path == tiny.default_model_dir("qwen2_5_vl", "tiny")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model("qwen2_5_vl") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_mrope_section_sums_to_half_head_dim() -> None:
    assert tiny.mrope_section(128) == [16, 24, 24]  # the real Qwen2-VL split
    for head_dim in (16, 64, 80, 128):
        assert sum(tiny.mrope_section(head_dim)) == head_dim // 2


def test_tokenizer_is_deterministic_and_has_special_tokens() -> None:
    a, b = build_tokenizer(), build_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert 1000 <= len(a) <= 2000
    assert a.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert (a.eos_token, a.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = "Héllo wörld 🙂 <|image_pad|> 12345"
    ids = a(text)["input_ids"]
    assert a.decode(ids) == text
    assert ids.count(a.convert_tokens_to_ids("<|image_pad|>")) == 1


def test_chat_template() -> None:
    tokenizer = build_tokenizer()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"type": "text", "text": "And?"},
            ],
        },
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>And?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_ensure_tiny_model_builds_once_under_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    monkeypatch.setenv("EPD_SERVE_CACHE", str(tmp_path))
    real_build, calls = tiny.make_tiny_model, []

    def slow_build(*args, **kwargs):
        calls.append(args)
        time.sleep(0.2)  # long enough for the other thread to reach the lock
        return real_build(*args, **kwargs)

    monkeypatch.setattr(tiny, "make_tiny_model", slow_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny_model())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tiny.default_model_dir()] * 2


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from cli import make_tiny_model as command

    parser = argparse.ArgumentParser(prog="epd-serve")
    command.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["make-tiny-model", str(tmp_path / "m"), "--family", "qwen2_5_vl", "--seed", "3"]
    )
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(tmp_path / "m"), "299,872 parameters"]
    assert json.loads((tmp_path / "m" / tiny.MARKER_FILE).read_text())["seed"] == 3
    assert args.run(args) == 2  # refuses to overwrite without --overwrite
    assert "--overwrite" in capsys.readouterr().err
