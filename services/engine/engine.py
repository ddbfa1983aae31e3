"""The engine: schedule, run, postprocess, one step at a time.

One class serves all three uses of the LLM: the monolithic path (prompt in, tokens out), a prefill
stage (`prefill_only`: a sequence stops after its first token and keeps its KV until a data plane has
shipped it and `release_prefilled` frees it), and a decode stage (`reserve` blocks for a prompt
computed elsewhere, let a data plane write its KV into them, then `admit_reserved` it: it goes on from
its first token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.logprobs import Logprobs
from common.sampling_params import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.inputs import ModelInputs
from services.engine.kv_cache import HostSwapper, KVCache
from services.engine.memory import fit_max_model_len, kv_layout, size_kv_pool
from services.engine.model_runner import LayerHook, ModelRunner
from services.engine.prefix_hash import mm_starts
from services.engine.scheduler import Scheduler
from services.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logits: torch.Tensor | None = None  # [vocab] of the new token, when the engine keeps logits
    logprobs: Logprobs | None = None  # of the new token, when the request asked for them
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when it was admitted
    position: int = 0  # the request's output index of new_token_ids[0] (0: its first token)


class StepError(RuntimeError):
    """A step failed after it was scheduled. The requests of that step are aborted (their blocks are
    free) and the engine is ready for the next step; `failed` holds what the scheduler had given up
    before the failure (outputs with `FinishReason.ERROR`), which the caller still reports."""

    def __init__(self, request_ids: list[str], failed: list[RequestOutput], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.failed = failed


class Engine:
    def __init__(
        self,
        family,
        eos_token_ids: list[int],
        config: EngineConfig | None = None,
        *,
        prefill_only: bool = False,
        keep_logits: bool = False,
        kv_buffer: torch.Tensor | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.family = family
        self.prefill_only = prefill_only
        self.keep_logits = keep_logits
        self.layout = kv_layout(family)
        bs = config.block_size
        if kv_buffer is None:
            num_blocks = size_kv_pool(family, config).num_blocks
        else:  # memory a data plane owns (shared memory, registered RDMA memory), sized by size_kv_pool
            kv_buffer = kv_buffer.view(self.layout.dtype).view(
                self.layout.num_layers, 2, -1, bs, self.layout.num_kv_heads, self.layout.head_dim
            )
            num_blocks = kv_buffer.shape[2]
        # the pool's last block is the scratch block padding rows write to: no sequence gets it
        usable = num_blocks - 1
        self.max_model_len = fit_max_model_len(
            config.max_model_len, family.max_position_embeddings, usable * bs
        )
        self.kv = KVCache(self.layout, num_blocks, bs, device=family.device, buffer=kv_buffer)
        self.block_manager = BlockManager(usable, bs, enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            HostSwapper(self.kv),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids,
            watermark_blocks=int(usable * config.watermark),
            num_swap_blocks=config.swap_space_bytes // (self.layout.token_bytes() * bs),
        )
        self.runner = ModelRunner(
            family, self.kv, config, self.max_model_len, decodes=not prefill_only, eos_token_ids=eos_token_ids
        )

    # ---- requests --------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        inputs: ModelInputs | None = None,
        mm_items: list[tuple[str, int]] = (),  # type: ignore[assignment]
    ) -> Sequence:
        """`mm_items`: (content hash, placeholder count) of the prompt's images and videos in order,
        when `inputs` carries their features: what the prefix cache keys their blocks by."""
        seq = Sequence(
            request_id, prompt_token_ids, params, model_inputs=inputs, prefill_only=self.prefill_only
        )
        if inputs is not None and inputs.mm_token_indices:
            if mm_items:
                seq.mm_starts = mm_starts(inputs.mm_token_indices, list(mm_items))
            else:  # features without their content keys: blocks of this prompt are not shared
                seq.cacheable = False
        self.scheduler.add(seq)
        return seq

    # ---- blocks written by someone else (a prefill stage, through a data plane) --------------------

    def reserve(self, request_id: str, num_prompt_tokens: int, params: SamplingParams) -> list[int] | None:
        """Set aside blocks for a prompt computed elsewhere; None when the pool has no room now."""
        seq = Sequence(request_id, [0] * num_prompt_tokens, params)  # the prompt arrives as KV only
        return list(seq.block_table) if self.scheduler.reserve(seq) else None

    def admit_reserved(
        self, request_id: str, token_ids: list[int], rope_delta: int = 0, prompt_len: int = 0
    ) -> Sequence:
        """The reserved blocks now hold the prompt's KV: decode on from `token_ids` (prompt + first;
        or, handed over by another decode engine, every token so far: see `Scheduler.arrive`)."""
        inputs = ModelInputs(rope_delta=rope_delta)
        return self.scheduler.arrive(request_id, token_ids, inputs, prompt_len=prompt_len)

    def detach(self, request_id: str) -> Sequence | None:
        """Stop decoding a request, its KV kept for a hand-off (`release_prefilled` frees it)."""
        return self.scheduler.detach(request_id)

    def release_prefilled(self, request_id: str) -> None:
        """Free a prefilled sequence whose KV has left by other means (a data plane)."""
        seq = self.scheduler.requests.get(request_id)
        if seq is not None and seq.status is SequenceStatus.PREFILLED:
            self.scheduler.release(seq)

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is (queued, running, swapped, prefilled or reserved)."""
        return self.scheduler.abort(request_id)

    def finish(self, request_id: str, reason: FinishReason = FinishReason.STOP) -> None:
        """End a request early (a stop string seen by whoever detokenizes)."""
        seq = self.scheduler.requests.get(request_id)
        if seq is not None:
            self.scheduler.finish(seq, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step --------------------------------------------------------------------------------

    def step(self, layer_hook: LayerHook | None = None) -> list[RequestOutput]:
        """One step; `layer_hook(layer, chunks)` is called as each layer's K/V of the prompts that
        complete in this step reach the pool (a prefill stage ships them from there)."""
        batch = self.scheduler.schedule()
        # requests the scheduler had to give up (no swap space, nothing to recompute from) end here
        failed = [RequestOutput(s.request_id, [], True, FinishReason.ERROR.value) for s in batch.failed]
        if not batch:
            return failed
        try:
            result = self.runner.execute(batch, keep_logits=self.keep_logits, layer_hook=layer_hook)
            updates = self.scheduler.postprocess(batch, result.tokens)
        except Exception as exc:  # one bad batch must not take every other request with it
            request_ids = [c.seq.request_id for c in batch.chunks]
            for rid in request_ids:
                self.abort(rid)
            raise StepError(request_ids, failed, exc) from exc
        outputs, k = failed, 0
        for u in updates:
            if u.new_token is None:
                continue
            logits = result.logits[k] if result.logits is not None else None
            logprobs = result.logprobs[k] if result.logprobs else None
            k += 1
            reason = u.seq.finish_reason.value if u.finished and u.seq.finish_reason else None
            outputs.append(
                RequestOutput(
                    u.seq.request_id,
                    [u.new_token],
                    u.finished,
                    reason,
                    logits,
                    logprobs,
                    u.seq.num_cached_tokens,
                    u.seq.num_output_tokens - 1,
                )  # fmt: skip
            )
        return outputs
