"""KV pool sizing and the context length it allows: the arithmetic with plain numbers (the accelerator
branch included, so CPU runs check it too), then real engines on a checkpoint whose config promises
a 32768-token context that a small pool cannot hold."""

from __future__ import annotations

import shutil

import pytest
import structlog
from transformers import AutoConfig

from common.prompting import chat_prompt_ids
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.llm import LLM
from services.engine.memory import (
    CPU_KV_CACHE_MEMORY,
    DeviceMemory,
    accelerator_kv_bytes,
    fit_max_model_len,
    kv_layout,
    profile_step,
    size_kv_pool,
)
from services.models.loader import load_model
from tests.reference import hf_greedy, make_image

GiB = 2**30
LONG_CONTEXT = 32768


# ---- the arithmetic -------------------------------------------------------------------------------


def test_accelerator_kv_gets_its_share_less_weights_peak_and_workspaces():
    # a 140 GiB device to itself: 16 GiB of weights, the step peaks 2 GiB above them, cuBLAS adds 1 GiB
    mem = DeviceMemory(
        total=140 * GiB, free=123 * GiB, torch_peak=18 * GiB, torch_allocated=16 * GiB,
        non_torch_increase=1 * GiB,
    )  # fmt: skip
    assert accelerator_kv_bytes(mem, 0.9) == int(0.9 * 140 * GiB) - 18 * GiB - 1 * GiB
    assert accelerator_kv_bytes(mem, 0.5) == 70 * GiB - 19 * GiB


def test_accelerator_kv_never_takes_memory_another_process_holds():
    # another process holds 60 GiB: what is free, less room for the step's activations, is the limit
    mem = DeviceMemory(
        total=140 * GiB, free=63 * GiB, torch_peak=18 * GiB, torch_allocated=16 * GiB, non_torch_increase=0
    )
    assert accelerator_kv_bytes(mem, 0.9) == 61 * GiB
    full = DeviceMemory(
        total=140 * GiB, free=1 * GiB, torch_peak=18 * GiB, torch_allocated=16 * GiB, non_torch_increase=0
    )
    assert accelerator_kv_bytes(full, 0.9) == 0
    assert accelerator_kv_bytes(mem, 0.1) == 0  # the share does not even cover the weights


def test_max_model_len_is_capped_by_the_pool_and_says_so():
    with structlog.testing.capture_logs() as logs:
        assert fit_max_model_len(None, LONG_CONTEXT, 4672) == 4672
    assert [e["event"] for e in logs] == ["max_model_len capped to what the KV pool holds"]
    assert logs[0]["max_model_len"] == 4672 and logs[0]["max_position_embeddings"] == LONG_CONTEXT
    with structlog.testing.capture_logs() as logs:
        assert fit_max_model_len(None, 4096, 8192) == 4096
        assert fit_max_model_len(2048, 4096, 2048) == 2048
        assert fit_max_model_len(8000, 4096, 8192) == 8000  # explicit beyond the config: the user's call
    assert logs == []


def test_explicit_max_model_len_beyond_the_pool_is_an_error_that_says_so():
    with pytest.raises(
        ValueError, match=r"max_model_len 8192 is more than the KV pool holds \(4672 tokens\)"
    ):
        fit_max_model_len(8192, LONG_CONTEXT, 4672)


# ---- pool sizes on a real (tiny) model ------------------------------------------------------------


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_qwen2_vl, tmp_path_factory):
    """The tiny checkpoint with a config that says `max_position_embeddings: 32768`."""
    path = tmp_path_factory.mktemp("ckpt") / "qwen2_vl-tiny-32k"
    shutil.copytree(tiny_qwen2_vl, path)
    config = AutoConfig.from_pretrained(path)
    config.text_config.max_position_embeddings = LONG_CONTEXT
    config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(long_context_checkpoint):
    model = load_model(long_context_checkpoint)
    assert model.family.max_position_embeddings == LONG_CONTEXT
    return model


def test_pool_sizes_on_cpu(loaded):
    fam = loaded.family
    token_bytes = kv_layout(fam).token_bytes()
    default = size_kv_pool(fam, EngineConfig())
    assert default.nbytes == CPU_KV_CACHE_MEMORY and default.num_tokens == CPU_KV_CACHE_MEMORY // token_bytes
    exact = size_kv_pool(fam, EngineConfig(kv_cache_memory=100 * 16 * token_bytes + 5))
    assert exact.num_blocks == 100, "whole blocks of the bytes given"
    # blocks named by the config are the ones sequences may use; the pool adds the scratch block
    assert size_kv_pool(fam, EngineConfig(num_blocks=7, kv_cache_memory=1)).num_blocks == 8


def test_a_pool_without_room_for_two_blocks_refuses_to_start(loaded):
    block = 16 * kv_layout(loaded.family).token_bytes()
    with pytest.raises(
        ValueError, match="room for 1 blocks .* fewer than the 2 .* give more kv_cache_memory"
    ):
        LLM(loaded, EngineConfig(kv_cache_memory=3 * block - 1))  # 2 blocks, one of them the scratch block


def test_profiling_step_runs_with_a_pool_just_large_enough(loaded):
    # the accelerator branch's forward pass, here on CPU: a full budget, the batch's worth of samples
    profile_step(
        loaded.family, EngineConfig(max_num_batched_tokens=100, max_num_seqs=8), kv_layout(loaded.family)
    )


def test_small_pool_caps_the_context_logs_it_and_serves(loaded, long_context_checkpoint):
    token_bytes = kv_layout(loaded.family).token_bytes()
    with structlog.testing.capture_logs() as logs:
        # 65 blocks: 64 for sequences (1024 tokens) and the scratch block
        llm = LLM(loaded, EngineConfig(kv_cache_memory=65 * 16 * token_bytes), keep_logits=True)
    assert llm.engine.max_model_len == 1024
    assert {"event": "max_model_len capped to what the KV pool holds", "max_model_len": 1024,
            "max_position_embeddings": LONG_CONTEXT, "log_level": "info"} in logs  # fmt: skip
    assert LLM(loaded).engine.max_model_len == LONG_CONTEXT, "the CPU default pool holds the whole context"

    fam = loaded.family
    image = make_image(140, 100)
    item = fam.preprocess(image)
    ids = chat_prompt_ids(
        loaded.tokenizer, "What is in this picture?", fam.image_token_id, [fam.num_image_tokens(item)]
    )
    expected, _ = hf_greedy(long_context_checkpoint, fam, ids, [item], 16)
    out = llm.generate("What is in this picture?", [image], SamplingParams(max_tokens=16))
    assert out.token_ids == expected
    with pytest.raises(ValueError, match="context is 1024 tokens"):
        llm.prepare("word " * 1100)


def test_explicit_context_larger_than_the_pool_fails_at_start(loaded):
    token_bytes = kv_layout(loaded.family).token_bytes()
    with pytest.raises(
        ValueError, match=r"max_model_len 4096 is more than the KV pool holds \(1024 tokens\)"
    ):
        LLM(loaded, EngineConfig(kv_cache_memory=65 * 16 * token_bytes, max_model_len=4096))
