"""What a decode instance checks in KV_RESERVE and KV_READY before it uses them.

Each check returns the problem as a sentence naming the field, or None (services/wire_checks.py).
A KV_READY is checked against the reservation it completes: the prompt length decode reserved
blocks for, the vocabulary of the model it embeds the first token with, its context.
"""

from __future__ import annotations

from common.protocol import KvReady, KvReserve
from services.wire_checks import ids_problem, token_problem


def kv_reserve_problem(msg: KvReserve, max_model_len: int) -> str | None:
    if problem := ids_problem(msg, "request_id", "prefill_id", "prefill_address"):
        return problem
    if not 1 <= msg.num_prompt_tokens < max_model_len:
        return (
            f"num_prompt_tokens must be between 1 and {max_model_len - 1} (the context of "
            f"{max_model_len} tokens, less one for output), got {msg.num_prompt_tokens}"
        )
    return None


def kv_ready_problem(msg: KvReady, reserved: KvReserve, vocab: int, max_model_len: int) -> str | None:
    n = reserved.num_prompt_tokens
    if msg.num_prompt_tokens != n:
        return f"num_prompt_tokens {msg.num_prompt_tokens} is not the {n} blocks were reserved for"
    if not n < len(msg.token_ids) < max_model_len:
        return (
            f"token_ids: {len(msg.token_ids)} tokens for a prompt of {n}; expected the prompt and at "
            f"least one sampled token, under the context of {max_model_len}"
        )
    if problem := token_problem("token_ids", msg.token_ids, vocab):
        return problem
    if not 0 <= msg.prompt_len <= n:
        return f"prompt_len {msg.prompt_len} is not between 0 and the {n} tokens whose KV came"
    if abs(msg.rope_delta) >= max_model_len:
        return f"rope_delta {msg.rope_delta} is not within the context of {max_model_len} tokens"
    return None
