"""Through the whole engine, every attention backend gives transformers' greedy tokens and logits.

A packed continuous batch (text-only and image prompts, requests joining while others decode, a token
budget small enough to split prompts into several prefill chunks) runs with the sdpa reference, the
cpu decode kernel, and the flex backend eagerly, compiled (the padded, bucketed shapes of production),
and through the decode-graph buffers (the path a CUDA graph replays, run here without capture);
`test_fidelity.py` covers the CPU default (`auto`, the cpu kernel where it builds) across modalities.
"""

from __future__ import annotations

import pytest

from common.prompting import chat_prompt_ids
from services.engine.config import EngineConfig
from services.engine.decode_graphs import DecodeGraphs
from services.engine.engine import Engine
from tests.reference import hf_greedy, make_image, max_logit_diff
from tests.services.engine.packed_batch import run_batch

TOL = 1e-4


def make_batch(loaded, n=6):
    fam = loaded.family
    sizes = [(56, 56), (140, 100), (84, 168)]
    batch = []
    for i in range(n):
        images = [make_image(*sizes[(i + k) % len(sizes)], seed=10 * i + k) for k in range(i % 3)]
        items = [fam.preprocess(img) for img in images]
        text = "Describe the scene " + "in great detail " * (i % 3)
        ids = chat_prompt_ids(
            loaded.tokenizer, text, fam.image_token_id, [fam.num_image_tokens(x) for x in items]
        )
        batch.append((f"r{i}", ids, items, 6 + 3 * i))
    return batch


@pytest.mark.parametrize("mode", ["sdpa", "cpu", "flex-eager", "flex-compiled", "flex-decode-graph-buffers"])
def test_packed_batch_matches_transformers(mode, checkpoint, loaded):
    fam = loaded.family
    backend = mode.split("-")[0]
    config = EngineConfig(
        num_blocks=96, max_model_len=1024, max_num_batched_tokens=40, max_num_seqs=8,
        attention_backend=backend, enforce_eager=mode != "flex-compiled",
    )  # fmt: skip
    engine = Engine(fam, loaded.eos_token_ids, config, keep_logits=True)
    assert engine.runner.backend.name == backend
    graphs = None
    if mode == "flex-decode-graph-buffers":
        graphs = DecodeGraphs(fam, engine.kv, engine.runner.backend, config.max_num_seqs, capture=False)
        engine.runner.graphs = graphs
    batch = make_batch(loaded)
    tokens, logits, max_running = run_batch(engine, loaded, batch)
    assert max_running >= 3, "requests should have overlapped in the running batch"
    if graphs is not None:
        assert graphs.steps > 10, "decode-only steps should have gone through the graph buffers"
    worst = 0.0
    for rid, ids, items, n in batch:
        ref_tokens, ref_logits = hf_greedy(checkpoint, fam, ids, items, n)
        assert tokens[rid] == ref_tokens, (
            f"{mode}: {rid} ({len(ids)} prompt tokens) differs from transformers"
        )
        worst = max(worst, max_logit_diff(logits[rid], ref_logits))
    print(f"{mode}: batch of {len(batch)}, up to {max_running} running, max logit diff {worst:.2e}")
    assert worst < TOL
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
