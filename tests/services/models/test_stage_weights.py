"""A process loads only what its roles need, and what it loads is exactly the checkpoint's.

The oracle is transformers' own `from_pretrained` of the whole model, and its `generate` for tokens:
an encode-only load must give the same features, and a language-model-only load fed those features the
same greedy tokens (and logits) as `generate` on the whole model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.prompting import chat_prompt_ids
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.models.loader import ModelLoadError, load_model
from tests.reference import hf_greedy, hf_model, make_image, max_logit_diff

TOL = 1e-4
VISION = "model.visual."


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tiny_qwen2_vl, tiny_qwen2_5_vl) -> Path:
    return {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[request.param]


@pytest.fixture(scope="module")
def full(checkpoint):
    return load_model(checkpoint, linear_backend="torch")


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_model(checkpoint, roles="E", linear_backend="torch")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def edited_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """A copy of checkpoint `src` whose tensors (a dict) and config (a dict) were changed in place."""
    shutil.copytree(src, dst)
    if edit_tensors:
        file = dst / "model.safetensors"
        tensors = load_file(file)
        edit_tensors(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def image_prompt(loaded, sizes=((224, 168), (56, 112))):
    fam = loaded.family
    items = [fam.preprocess(make_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    counts = [fam.num_image_tokens(i) for i in items]
    return chat_prompt_ids(loaded.tokenizer, "What is in these pictures?", fam.image_token_id, counts), items


def engine_generate(lm, features, ids, items, max_tokens):
    """Greedy tokens and logits of one request run by the engine on the (language-model) load `lm`."""
    fam = lm.family
    inputs = fam.model_inputs(ids, [i.grid_thw for i in items], features)
    assert inputs.rope_delta != 0, "an image prompt should shift positions: get_rope_index must have run"
    engine = Engine(fam, lm.eos_token_ids, EngineConfig(num_blocks=128, max_model_len=2048), keep_logits=True)
    engine.add_request("r", ids, SamplingParams(max_tokens=max_tokens), inputs)
    tokens, logits = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logits.append(out.logits)
    return tokens, logits


@pytest.mark.parametrize("roles", ["P", "D", "PD"])
def test_a_load_without_encode_has_the_language_model_and_no_vision_tower(checkpoint, full, roles):
    lm = load_model(checkpoint, roles=roles, linear_backend="torch")
    fam = lm.family
    assert lm.parts == {"text"} and fam.visual is None
    names = [n for n, _ in fam.model.named_parameters()]
    assert not [n for n in names if n.startswith(VISION)], "vision parameters in a process without E"
    assert count(fam.model) == count(full.family.model) - count(full.family.visual)
    reference = full.family.model.state_dict()
    for name, tensor in fam.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), f"{name} differs from transformers' own load"
    for name, buffer in fam.model.named_buffers():  # rotary frequencies, computed rather than stored
        assert torch.equal(buffer, full.family.model.get_buffer(name)), name
    with pytest.raises(RuntimeError, match="vision tower"):
        fam.encode(image_prompt(lm)[1])


def test_an_encode_only_load_has_only_the_vision_tower(full, encoder):
    fam = encoder.family
    assert encoder.parts == {"vision"}
    assert fam.language_model is None and fam.lm_head is None
    names = [n for n, _ in fam.model.named_parameters()]
    assert names and all(n.startswith(VISION) for n in names), "language-model parameters in an E process"
    assert count(fam.model) == count(full.family.visual)
    assert fam.dtype == torch.float32 and fam.device.type == "cpu"
    with pytest.raises(RuntimeError, match="language model"):
        fam.embed(torch.tensor([1, 2]))


def test_encode_only_features_equal_the_whole_models_exactly(checkpoint, full, encoder):
    """Bit for bit against the whole model loaded the same way; against transformers' own tower within
    float summation order (our patch embedding is a matrix product: services/models/patch_embed.py)."""
    _, items = image_prompt(encoder)
    ours = torch.cat(encoder.family.encode(items))
    whole = torch.cat(full.family.encode(items))
    assert torch.equal(ours, whole), f"max difference {float((ours - whole).abs().max()):.2e}"
    model = hf_model(str(checkpoint))
    with torch.inference_mode():
        pixels = torch.cat([i.pixel_values for i in items])
        grid = torch.tensor([i.grid_thw for i in items])
        ref = model.model.visual(pixels, grid_thw=grid).pooler_output
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("roles", ["P", "D", "PD"])
def test_encode_and_language_model_loads_together_match_generate(checkpoint, encoder, roles):
    lm = load_model(checkpoint, roles=roles, linear_backend="torch")
    ids, items = image_prompt(encoder)
    features = encoder.family.encode(items)
    ref_tokens, ref_logits = hf_greedy(checkpoint, encoder.family, ids, items, 24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, logits = engine_generate(lm, features, ids, items, 24)
    diff = max_logit_diff(logits, ref_logits)
    print(f"E load + {roles} load: {len(ids)} prompt tokens, max logit diff {diff:.2e}")
    assert tokens == ref_tokens
    assert diff < TOL
    future = sorted({str(w.message) for w in caught if issubclass(w.category, FutureWarning)})
    assert not future, f"the language model call warns: {future}"


def test_tied_embeddings_are_tied_in_a_load_without_encode(checkpoint, encoder, tmp_path):
    tied = edited_copy(
        checkpoint,
        tmp_path / "tied",
        edit_tensors=lambda t: t.pop("lm_head.weight"),  # tied checkpoints store the embedding once
        edit_config=lambda c: c.update(tie_word_embeddings=True),
    )
    model = hf_model(str(tied))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight, "oracle is not tied"
    lm = load_model(tied, roles="PD", linear_backend="torch")
    fam = lm.family
    assert fam.lm_head.weight is fam.language_model.embed_tokens.weight
    assert count(fam.model) == count(model) - count(model.model.visual)
    ids, items = image_prompt(encoder)
    ref_tokens, ref_logits = hf_greedy(tied, fam, ids, items, 16)
    tokens, logits = engine_generate(lm, encoder.family.encode(items), ids, items, 16)
    assert tokens == ref_tokens
    assert max_logit_diff(logits, ref_logits) < TOL
    assert load_model(tied, roles="E", linear_backend="torch").family.lm_head is None


def test_tied_config_with_two_different_stored_copies_keeps_them_apart_as_transformers_does(
    checkpoint, tmp_path
):
    both = edited_copy(
        checkpoint, tmp_path / "both", edit_config=lambda c: c.update(tie_word_embeddings=True)
    )
    model = hf_model(str(both))
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    fam = load_model(both, roles="P", linear_backend="torch").family
    assert fam.lm_head.weight is not fam.language_model.embed_tokens.weight
    assert torch.equal(fam.lm_head.weight, model.lm_head.weight)


def _new_layout(tensors: dict) -> None:
    """`visual.*` -> `model.visual.*`, `model.layers.*` -> `model.language_model.layers.*` (and so on)."""
    for key in list(tensors):
        if key.startswith("visual."):
            tensors["model." + key] = tensors.pop(key)
        elif key.startswith("model."):
            tensors["model.language_model." + key.removeprefix("model.")] = tensors.pop(key)


@pytest.mark.parametrize("roles", ["E", "P"])
def test_both_checkpoint_layouts_load_the_same_tensors(checkpoint, tmp_path, roles):
    renamed = edited_copy(checkpoint, tmp_path / "renamed", edit_tensors=_new_layout)
    names = load_file(renamed / "model.safetensors").keys()
    assert any(n.startswith("model.language_model.") for n in names)
    ref = hf_model(str(checkpoint)).state_dict()
    for name, t in hf_model(str(renamed)).state_dict().items():  # transformers reads this layout too
        assert torch.equal(t, ref[name]), name
    ours = load_model(renamed, roles=roles, linear_backend="torch").family.model.state_dict()
    assert ours and all(torch.equal(t, ref[name]) for name, t in ours.items())


def test_the_vision_weights_are_not_needed_without_encode(checkpoint, tmp_path):
    """A checkpoint with no vision tensors at all serves P and D, and refuses E saying what is missing."""
    no_vision = edited_copy(
        checkpoint,
        tmp_path / "no-vision",
        edit_tensors=lambda t: [t.pop(k) for k in list(t) if k.startswith("visual.")],
    )
    lm = load_model(no_vision, roles="P", linear_backend="torch")
    ref = hf_model(str(checkpoint)).state_dict()
    assert all(torch.equal(t, ref[name]) for name, t in lm.family.model.state_dict().items())
    with pytest.raises(ModelLoadError, match=r"roles E: the checkpoint has no tensor for model\.visual\."):
        load_model(no_vision, roles="E", linear_backend="torch")


def test_bad_roles_are_refused(checkpoint):
    with pytest.raises(ModelLoadError, match="roles must be some of"):
        load_model(checkpoint, roles="X", linear_backend="torch")
