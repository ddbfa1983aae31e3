"""The engine: schedule, run, postprocess, one step at a time.

One class serves all three uses of the LLM: the monolithic path (prompt in, tokens out), a prefill
stage (`prefill_only`: a sequence stops after its first token and keeps its KV until `take_prefilled`
hands it over), and a decode stage (`add_prefilled`: a sequence arrives with its KV and goes on from
its first token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.sampling_params import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.inputs import ModelInputs
from services.engine.kv_cache import HostSwapper, KVCache, KVLayout
from services.engine.model_runner import ModelRunner
from services.engine.scheduler import Scheduler
from services.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logits: torch.Tensor | None = None  # [vocab] of the new token, when the engine keeps logits


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
        self.layout = KVLayout(family.num_layers, family.num_kv_heads, family.head_dim, family.dtype)
        self.max_model_len = config.max_model_len or family.max_position_embeddings
        bs = config.block_size
        num_blocks = config.num_blocks or config.kv_cache_memory // (self.layout.token_bytes() * bs)
        if num_blocks * bs < self.max_model_len:
            raise ValueError(
                f"the KV pool holds {num_blocks * bs} tokens, less than max_model_len "
                f"{self.max_model_len}: give more blocks/memory or a smaller max_model_len"
            )
        if kv_buffer is not None:  # memory a data plane owns (shared memory, registered RDMA memory)
            kv_buffer = kv_buffer.view(self.layout.dtype).view(
                self.layout.num_layers, 2, -1, bs, self.layout.num_kv_heads, self.layout.head_dim
            )
            num_blocks = kv_buffer.shape[2]
        self.kv = KVCache(self.layout, num_blocks, bs, device=family.device, buffer=kv_buffer)
        self.block_manager = BlockManager(num_blocks, bs)
        self.scheduler = Scheduler(
            self.block_manager,
            HostSwapper(self.kv),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids,
            watermark_blocks=int(num_blocks * config.watermark),
        )
        self.runner = ModelRunner(family, self.kv)
        self._reserved: dict[str, Sequence] = {}

    # ---- requests --------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        inputs: ModelInputs | None = None,
    ) -> Sequence:
        seq = Sequence(
            request_id, prompt_token_ids, params, model_inputs=inputs, prefill_only=self.prefill_only
        )
        self.scheduler.add(seq)
        return seq

    def add_prefilled(
        self,
        request_id: str,
        token_ids: list[int],
        num_prompt_tokens: int,
        params: SamplingParams,
        kv: torch.Tensor,
        rope_delta: int = 0,
    ) -> Sequence:
        """Admit a sequence whose prompt was computed elsewhere: `token_ids` is the prompt and the
        tokens sampled since, `kv` the token-major KV of the prompt (see `KVCache.export_tokens`)."""
        if kv.shape[2] != num_prompt_tokens:
            raise ValueError(f"{request_id}: KV for {kv.shape[2]} tokens, prompt has {num_prompt_tokens}")
        seq = Sequence(
            request_id, token_ids[:num_prompt_tokens], params, model_inputs=ModelInputs(rope_delta=rope_delta)
        )
        seq.token_ids.extend(token_ids[num_prompt_tokens:])
        seq.num_computed_tokens = num_prompt_tokens
        seq.swapped_kv = kv
        seq.status = SequenceStatus.SWAPPED
        self.scheduler.add(seq)
        return seq

    # ---- blocks written by someone else (a prefill stage, through a data plane) --------------------

    def reserve(self, request_id: str, num_prompt_tokens: int, params: SamplingParams) -> list[int] | None:
        """Set aside blocks for a prompt computed elsewhere; None when the pool has no room now."""
        if request_id in self._reserved or request_id in self.scheduler.requests:
            raise ValueError(f"request {request_id} is already in the engine")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"{num_prompt_tokens} prompt tokens leave no room within {self.max_model_len}")
        seq = Sequence(request_id, [0] * num_prompt_tokens, params)
        bm = self.block_manager
        if bm.blocks_for(num_prompt_tokens) + self.scheduler.watermark_blocks > bm.num_free_blocks:
            return None
        bm.grow(seq, num_prompt_tokens)
        self._reserved[request_id] = seq
        return list(seq.block_table)

    def admit_reserved(self, request_id: str, token_ids: list[int], rope_delta: int = 0) -> Sequence:
        """The reserved blocks now hold the prompt's KV: decode on from `token_ids` (prompt + first)."""
        seq = self._reserved.pop(request_id)
        n = seq.num_prompt_tokens
        seq.token_ids = list(token_ids)
        seq.model_inputs = ModelInputs(rope_delta=rope_delta)
        seq.num_computed_tokens = n
        seq.status = SequenceStatus.SWAPPED  # with its blocks in place: admitted without a copy
        self.scheduler.add(seq)
        return seq

    def release_reservation(self, request_id: str) -> bool:
        seq = self._reserved.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)
        return seq is not None

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def take_prefilled(self, request_id: str) -> torch.Tensor:
        """The KV of a prefilled sequence (token-major, on the host); frees its blocks."""
        seq = self.scheduler.requests[request_id]
        if seq.status is not SequenceStatus.PREFILLED:
            raise ValueError(f"{request_id} is {seq.status.value}, not prefilled")
        kv = self.kv.export_tokens(seq.block_table, seq.num_computed_tokens)
        self.scheduler.release(seq)
        return kv

    def release_prefilled(self, request_id: str) -> None:
        """Free a prefilled sequence whose KV has left by other means (a data plane)."""
        seq = self.scheduler.requests.get(request_id)
        if seq is not None and seq.status is SequenceStatus.PREFILLED:
            self.scheduler.release(seq)

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is (queued, running, swapped, prefilled or reserved)."""
        return self.release_reservation(request_id) or self.scheduler.abort(request_id)

    def finish(self, request_id: str, reason: FinishReason = FinishReason.STOP) -> None:
        """End a request early (a stop string seen by whoever detokenizes)."""
        seq = self.scheduler.requests.get(request_id)
        if seq is not None:
            self.scheduler.finish(seq, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        result = self.runner.execute(batch, keep_logits=self.keep_logits)
        updates = self.scheduler.postprocess(batch, result.tokens)
        outputs, k = [], 0
        for u in updates:
            if u.new_token is None:
                continue
            logits = result.logits[k] if result.logits is not None else None
            k += 1
            reason = u.seq.finish_reason.value if u.finished and u.seq.finish_reason else None
            outputs.append(RequestOutput(u.seq.request_id, [u.new_token], u.finished, reason, logits))
        return outputs
