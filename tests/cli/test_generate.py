"""`epd-serve generate` as a user runs it: a real subprocess, JSON out, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.prompting import chat_prompt_ids
from services.models.loader import load_model
from tests.reference import hf_greedy, make_image


def epd(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_help_is_quick_and_torch_free():
    code = "import sys, cli.main; cli.main.build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = epd("generate", "--help")
    assert out.returncode == 0 and "--max-tokens" in out.stdout


def test_generate_json_equals_transformers_greedy(tiny_qwen2_vl, tmp_path):
    image_path = tmp_path / "cat.png"
    make_image(140, 100).save(image_path)
    out = epd(
        "generate", "--model", str(tiny_qwen2_vl), "--prompt", "What is this?",
        "--image", str(image_path), "--max-tokens", "12", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"text", "token_ids", "finish_reason"}

    loaded = load_model(tiny_qwen2_vl)
    fam = loaded.family
    from PIL import Image

    item = fam.preprocess(Image.open(image_path).convert("RGB"))
    ids = chat_prompt_ids(loaded.tokenizer, "What is this?", fam.image_token_id, [fam.num_image_tokens(item)])
    ref, _ = hf_greedy(tiny_qwen2_vl, fam, ids, [item], 12)
    assert result["token_ids"] == ref
    assert result["finish_reason"] == ("length" if len(ref) == 12 else "stop")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "/no/such/image.png"], "not found"),
        (["--image", "pyproject.toml"], "not an image"),
        (["--prompt", "word " * 5000], "context is"),
        (["--max-tokens", "0"], "max_tokens must be between 1 and"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_qwen2_vl, args, message):
    base = ["generate", "--model", str(tiny_qwen2_vl)]
    if "--prompt" not in args:
        base += ["--prompt", "hi"]
    out = epd(*base, *args)
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_unsupported_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    out = epd("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2 and "not supported; supported: qwen2_vl, qwen2_5_vl" in out.stderr
