"""The engine on a CUDA device: every backend, eager and with decode CUDA graphs, against transformers
running on the same device (fp32: the same tokens and logits within 1e-3; bf16: the same greedy tokens
as transformers' own bf16 generate for these prompts, with the logit difference reported)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForImageTextToText

from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.models.loader import load_model
from tests.reference import max_logit_diff
from tests.services.engine.attention.test_backend_fidelity import make_batch
from tests.services.engine.packed_batch import run_batch

# mode: (attention backend, decode CUDA graphs); flex kernels are compiled (Triton) in every mode
MODES = {"sdpa": ("sdpa", False), "flex": ("flex", False), "flex-graphs": ("flex", True)}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tiny_qwen2_vl, tiny_qwen2_5_vl):
    return {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[request.param]


@functools.cache
def hf_on_cuda(path: str, dtype: torch.dtype):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to("cuda").eval()


def hf_greedy_cuda(path, family, ids, items, n, dtype):
    model = hf_on_cuda(str(path), dtype)
    input_ids = torch.tensor([ids], device="cuda")
    kwargs = {}
    if items:
        kwargs["pixel_values"] = torch.cat([i.pixel_values for i in items]).to("cuda", dtype)
        kwargs["image_grid_thw"] = torch.tensor([i.grid_thw for i in items], device="cuda")
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == family.image_token_id).int(), max_new_tokens=n, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences[0, len(ids) :].tolist(), [lg[0].float().cpu() for lg in out.logits]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_packed_batch_on_cuda_matches_transformers(mode, dtype, checkpoint):
    loaded = load_model(checkpoint, device="cuda", dtype=dtype)
    fam = loaded.family
    backend, use_graphs = MODES[mode]
    config = EngineConfig(
        num_blocks=256, max_model_len=1024, max_num_batched_tokens=64, max_num_seqs=8,
        attention_backend=backend, enforce_eager=False,
    )  # fmt: skip
    engine = Engine(fam, loaded.eos_token_ids, config, keep_logits=True)
    if not use_graphs:
        engine.runner.graphs = None
    batch = make_batch(loaded)
    tokens, logits, _ = run_batch(engine, loaded, batch)
    torch_dtype = getattr(torch, dtype)
    worst, mismatched = 0.0, []
    for rid, ids, items, n in batch:
        ref_tokens, ref_logits = hf_greedy_cuda(checkpoint, fam, ids, items, n, torch_dtype)
        if tokens[rid] != ref_tokens:
            mismatched.append(rid)
            continue
        worst = max(worst, max_logit_diff([x.cpu() for x in logits[rid]], ref_logits))
    graphs = engine.runner.graphs
    print(f"cuda {dtype} {mode}: max logit diff {worst:.2e}, graph steps {graphs.steps if graphs else 0}")
    assert not mismatched, f"{mode} {dtype}: {mismatched} differ from transformers on the same device"
    if dtype == "float32":
        assert worst < 1e-3
    if mode == "flex-graphs":
        assert graphs is not None and not graphs.failed and graphs.steps > 0


def test_seeded_sampling_is_the_same_on_cuda_and_cpu(tiny_qwen2_vl):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    outs = []
    for device in ("cpu", "cuda"):
        loaded = load_model(tiny_qwen2_vl, device=device, dtype="float32")
        engine = Engine(loaded.family, loaded.eos_token_ids, EngineConfig(num_blocks=64, max_model_len=512))
        engine.add_request("s", list(range(100, 140)), params)
        tokens = []
        while engine.has_unfinished():
            tokens += [t for o in engine.step() for t in o.new_token_ids]
        outs.append(tokens)
    assert outs[0] == outs[1]
