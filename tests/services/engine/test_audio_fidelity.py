"""Qwen2-Audio prompts: our features, placeholder counts and paged engine give transformers' greedy output.

The reference is transformers' own pipeline on the same tiny checkpoint, fp32: `Qwen2AudioProcessor`
(the checkpoint's WhisperFeatureExtractor and chat template) makes `input_ids`, `input_features` and
`feature_attention_mask`, and `Qwen2AudioForConditionalGeneration.generate(do_sample=False)` decodes.
Our side counts the placeholders without torch (common/audio_features.py), makes the features with
`Qwen2AudioFamily.preprocess_audio`, runs the encoder batched, scatters the rows and decodes with the
engine's paged attention. Clips of different lengths share one encoder batch, as in the encode stage.
"""

from __future__ import annotations

import functools

import pytest
import torch

from common.audio_features import AudioGeometry
from common.prompting import expand_by_kind, mm_message, render_chat
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.models.loader import load_model
from tests.audio_helpers import tone
from tests.reference import max_logit_diff

TOL = 1e-4
MAX_TOKENS = 16
CASES = {  # seconds of each clip, in prompt order
    "one_second": [1.0],
    "seven_seconds": [7.3],
    "two_lengths": [0.5, 2.5],
}


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_audio):
    return load_model(tiny_qwen2_audio)


@functools.cache
def hf(path: str):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return AutoProcessor.from_pretrained(path), model


def reference(path, text, clips):
    processor, model = hf(str(path))
    messages = mm_message(text, ["audio"] * len(clips))
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    sr = processor.feature_extractor.sampling_rate
    inputs = processor(text=prompt, audio=clips, sampling_rate=sr, return_tensors="pt")
    out = model.generate(
        **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    ids = inputs["input_ids"][0].tolist()
    return ids, inputs, out.sequences[0, len(ids) :].tolist(), [lg[0] for lg in out.logits]


def our_prompt(path, loaded, text, clips):
    fam = loaded.family
    geometry = AudioGeometry.from_dir(path)  # the gateway's count, without torch
    ids = render_chat(loaded.tokenizer, mm_message(text, ["audio"] * len(clips)))
    counts = [geometry.num_tokens(len(c)) for c in clips]
    return expand_by_kind(ids, {"audio": fam.audio_token_id}, ["audio"] * len(clips), counts)


def ours(loaded, ids, features):
    fam = loaded.family
    engine = Engine(
        fam, loaded.eos_token_ids, EngineConfig(num_blocks=128, max_model_len=2048), keep_logits=True
    )
    grids = [(1, 1, f.shape[0]) for f in features]
    inputs = fam.model_inputs(ids, grids, features, ["audio"] * len(features))
    engine.add_request("r", ids, SamplingParams(max_tokens=MAX_TOKENS), inputs)
    tokens, logits = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logits.append(out.logits)
    return tokens, logits


@pytest.mark.parametrize("case", list(CASES))
def test_audio_greedy_matches_transformers(case, tiny_qwen2_audio, loaded):
    clips = [tone(s, seed=i, freq=300.0 + 200 * i) for i, s in enumerate(CASES[case])]
    text = "What sound is this?"
    ref_ids, ref_inputs, ref_tokens, ref_logits = reference(tiny_qwen2_audio, text, clips)
    ids = our_prompt(tiny_qwen2_audio, loaded, text, clips)
    assert ids == ref_ids  # template, torch-free count and expansion: the processor's prompt
    items = [loaded.family.preprocess_audio(c) for c in clips]
    for i, item in enumerate(items):  # the processor's features, exactly
        assert torch.equal(item.input_features, ref_inputs["input_features"][i])
        assert item.num_frames == int(ref_inputs["feature_attention_mask"][i].sum())
    tokens, logits = ours(loaded, ids, loaded.family.encode(items))
    diff = max_logit_diff(logits, ref_logits)
    print(
        f"{case}: tokens per clip {[i.num_tokens for i in items]}, {len(ids)} prompt tokens, diff {diff:.2e}"
    )
    assert tokens == ref_tokens
    assert diff < TOL


def test_batched_encode_equals_one_clip_at_a_time(loaded):
    fam = loaded.family
    items = [fam.preprocess_audio(tone(s, seed=3)) for s in (0.4, 3.0, 1.7)]
    batched = fam.encode(items)
    for item, rows in zip(items, batched, strict=True):
        alone = fam.encode([item])[0]
        assert rows.shape == (item.num_tokens, fam.hidden_size)
        assert float((rows - alone).abs().max()) < 1e-5


def test_features_decide_the_answer(tiny_qwen2_audio, loaded):
    """Guards the test above: the answer depends on the features scattered at the placeholders, so a
    misplaced or dropped feature row could not pass it."""
    clips = [tone(1.0)]
    ids = our_prompt(tiny_qwen2_audio, loaded, "What sound is this?", clips)
    features = loaded.family.encode([loaded.family.preprocess_audio(clips[0])])
    tokens, _ = ours(loaded, ids, features)
    zeroed, _ = ours(loaded, ids, [torch.zeros_like(features[0])])
    assert tokens != zeroed


def test_stage_loading_encoder_and_language_model_apart(tiny_qwen2_audio, loaded):
    """An E-only process builds only the audio tower and projector, a PD one only the language model;
    together they give what the whole model gives."""
    enc = load_model(tiny_qwen2_audio, roles="E")
    text = load_model(tiny_qwen2_audio, roles="PD")
    assert enc.family.language_model is None and enc.family.lm_head is None
    assert text.family.audio_tower is None and text.family.projector is None
    clip = tone(2.0, seed=5)
    item = enc.family.preprocess_audio(clip)
    features = enc.family.encode([item])
    assert torch.equal(features[0], loaded.family.encode([item])[0])
    ids = our_prompt(tiny_qwen2_audio, loaded, "And this?", [clip])
    assert ours(text, ids, features)[0] == ours(loaded, ids, features)[0]
