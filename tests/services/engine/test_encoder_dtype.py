"""A bfloat16 vision tower in front of a float32 language model gives transformers' tokens and logits
with the same tower cast; a process without the tower is left alone."""

from __future__ import annotations

import pytest
import torch

from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.llm import LLM
from services.models.encoder_dtype import set_encoder_dtype
from services.models.loader import load_model
from tests.reference import hf_greedy, make_image, max_logit_diff
from tests.services.engine.test_fidelity import prompt


def test_a_bfloat16_encoder_matches_transformers_with_the_same_cast(tiny_qwen2_vl):
    loaded = load_model(tiny_qwen2_vl, encoder_dtype="bfloat16")
    assert next(loaded.family.visual.parameters()).dtype == torch.bfloat16
    assert loaded.family.dtype == torch.float32  # the language model (and the KV) stay as they were
    images = [make_image(140, 100, seed=1), make_image(84, 112, seed=2)]
    ids, items = prompt(loaded, "Compare the two pictures.", images)
    assert loaded.family.encode(items[:1])[0].dtype == torch.bfloat16
    ref_tokens, ref_logits = hf_greedy(tiny_qwen2_vl, loaded.family, ids, items, 12, encoder_dtype="bfloat16")
    llm = LLM(loaded, EngineConfig(num_blocks=128, max_model_len=2048), keep_logits=True)
    out = llm.generate("Compare the two pictures.", images, SamplingParams(max_tokens=12))
    assert out.token_ids == ref_tokens
    assert max_logit_diff(out.logits, ref_logits) < 1e-4


def test_a_process_without_the_encoder_is_left_alone_and_bad_dtypes_are_refused(tiny_qwen2_vl):
    text_only = load_model(tiny_qwen2_vl, roles="PD")
    set_encoder_dtype(text_only.family, "bfloat16")  # no tower here: nothing to cast
    assert text_only.family.dtype == torch.float32
    with pytest.raises(ValueError, match="encoder dtype"):
        set_encoder_dtype(text_only.family, "int8")
