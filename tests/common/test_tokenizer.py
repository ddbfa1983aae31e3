"""The torch-free tokenizer gives exactly what transformers' AutoTokenizer gives on the same checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from common.tokenizer import ChatTemplateError, TextTokenizer

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
CONVERSATIONS = {
    "string content": [{"role": "user", "content": "Hello, how are you?"}],
    "image and text parts": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}
    ],
    "openai image_url parts": [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "Describe."}, IMAGE]}
    ],
    "multi-turn with system": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": [{"type": "text", "text": "Ünïcödé ✓ and 🙂?"}, {"type": "image"}]},
        {"role": "assistant", "content": "A red square on the left."},
        {"role": "user", "content": "And the colour of the circle?"},
    ],
    "assistant content null": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ],
}


@pytest.fixture(scope="module", params=["tiny_qwen2_vl", "tiny_qwen2_5_vl"])
def pair(request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(request.param)
    return TextTokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_chat_ids_matches_transformers(pair, name) -> None:
    ours, ref = pair
    messages = CONVERSATIONS[name]
    expected = _ids(ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    assert ours.render_chat_ids(messages) == expected, f"{name}: token ids differ from transformers"
    text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(messages) == text


def test_without_generation_prompt_matches_transformers(pair) -> None:
    ours, ref = pair
    messages = CONVERSATIONS["multi-turn with system"]
    text = ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == text


def test_encode_and_decode_match_transformers(pair) -> None:
    ours, ref = pair
    text = "A red fox jumps over 12 lazy dogs. Ünïcödé ✓ 🙂 <|im_end|> done"
    ids = ref.encode(text, add_special_tokens=False)
    assert ours.encode(text) == ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_decode_of_every_prefix_matches_including_partial_utf8(pair) -> None:
    ours, ref = pair
    ids = ref.encode("héllo ✓ 🙂 wörld — 北京", add_special_tokens=False)
    prefixes = [ids[:n] for n in range(len(ids) + 1)]
    assert any(ref.decode(p, skip_special_tokens=True).endswith("\ufffd") for p in prefixes), (
        "no partial char"
    )
    for prefix in prefixes:
        assert ours.decode(prefix) == ref.decode(prefix, skip_special_tokens=True), prefix


def test_special_ids_and_sizes_match_transformers(pair) -> None:
    from transformers import GenerationConfig

    ours, ref = pair
    generation = GenerationConfig.from_pretrained(ref.name_or_path)
    eos = generation.eos_token_id
    expected_eos = list(dict.fromkeys([*(eos if isinstance(eos, list) else [eos]), ref.eos_token_id]))
    assert ours.eos_token_ids == expected_eos
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.vocab_size == len(ref)
    assert ours.token_id("<|image_pad|>") == ref.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(KeyError, match="not in the vocabulary"):
        ours.token_id("<|no_such_token|>")


def test_tokens_only_in_the_config_are_added_like_transformers(tiny_qwen2_vl, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen2_vl, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        "5000": {
            "content": "<|extra|>",
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
        },
        "5001": {
            "content": "<plain>",
            "special": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = TextTokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    text = "a<|extra|>b <plain> c"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ours.vocab_size == len(ref)
    ids = ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


FEATURE_TEMPLATE = (
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "{% if m.role == 'user' and m.content is string and 'forbidden' in m.content %}"
    "{{ raise_exception('no forbidden words') }}{% endif %}"
    "[{{ ns.n }}] {{ m.role }}: {{ m.content | tojson }}\n"
    "{% generation %}{{ eos_token }}{% endgeneration %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_template_features_render_like_transformers(tiny_qwen2_vl) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    base = TextTokenizer.from_dir(tiny_qwen2_vl)
    ours = TextTokenizer(
        Tokenizer.from_file(str(Path(tiny_qwen2_vl) / "tokenizer.json")),
        special_tokens=base.special_tokens,
        chat_template=FEATURE_TEMPLATE,
    )
    messages = [
        {"role": "system", "content": "skip me"},
        {"role": "user", "content": 'Say "<b>" & ünï'},
        {"role": "assistant", "content": "ok"},
    ]
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=FEATURE_TEMPLATE,
        add_generation_prompt=True,
        **base.special_tokens,
    )
    assert ours.apply_chat_template(messages) == rendered[0]
    assert '"Say \\"<b>\\" & ünï"' in rendered[0]  # tojson without HTML escaping
    with pytest.raises(ChatTemplateError, match="no forbidden words"):
        ours.apply_chat_template([{"role": "user", "content": "a forbidden thing"}])


def test_a_model_without_a_chat_template_says_so(tiny_qwen2_vl) -> None:
    bare = TextTokenizer(Tokenizer.from_file(str(Path(tiny_qwen2_vl) / "tokenizer.json")))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
