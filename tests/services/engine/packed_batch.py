"""Drive an engine through a packed continuous batch: a new request joins every other step."""

from __future__ import annotations

from common.sampling_params import SamplingParams
from services.engine.engine import Engine


def run_batch(engine: Engine, loaded, batch) -> tuple[dict, dict, int]:
    fam = loaded.family
    pending = list(batch)
    tokens = {rid: [] for rid, *_ in batch}
    logits = {rid: [] for rid, *_ in batch}
    step = max_running = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:  # a new request joins every other step
            rid, ids, items, n = pending.pop(0)
            inputs = fam.model_inputs(ids, [i.grid_thw for i in items], fam.encode(items))
            engine.add_request(rid, ids, SamplingParams(max_tokens=n), inputs)
        max_running = max(max_running, len(engine.scheduler.running))
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logits[out.request_id].append(out.logits)
        step += 1
    return tokens, logits, max_running
