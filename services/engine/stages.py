"""The three stages as separate units: what the Encode, Prefill and Decode services call.

  encode(images)                -> one feature tensor per image
  prefill(requests with features) -> first token, rope_delta and the prompt's KV as raw bytes
  decode: add(prefill result)   -> step() yields tokens until each request stops

The hand-off between prefill and decode is plain data (ints and bytes), never process state: a decode
stage in another process, or on another host, continues a request from exactly what it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine, RequestOutput


@dataclass(slots=True)
class PrefillRequest:
    request_id: str
    token_ids: list[int]  # the prompt, placeholders expanded
    params: SamplingParams
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # one per image, prompt order
    features: list[torch.Tensor] = field(default_factory=list)  # from the encode stage


@dataclass(slots=True)
class PrefillResult:
    request_id: str
    token_ids: list[int]  # prompt + first token
    num_prompt_tokens: int
    rope_delta: int
    finished: bool  # the first token already ended the request (EOS, max_tokens=1)
    finish_reason: str | None
    kv: bytes | None  # token-major KV of the prompt; None when finished
    logits: torch.Tensor | None = None

    @property
    def first_token(self) -> int:
        return self.token_ids[-1]


class EncodeStage:
    def __init__(self, family: Any) -> None:
        self.family = family

    def encode(self, images: list[Any]) -> list[torch.Tensor]:
        """PIL images (or preprocessed items) -> features, batched in one encoder call."""
        items = [img if hasattr(img, "grid_thw") else self.family.preprocess(img) for img in images]
        return self.family.encode(items)


class PrefillStage:
    def __init__(
        self,
        family: Any,
        eos_token_ids: list[int],
        config: EngineConfig | None = None,
        keep_logits: bool = False,
    ) -> None:
        self.family = family
        self.engine = Engine(family, eos_token_ids, config, prefill_only=True, keep_logits=keep_logits)

    def prefill(self, requests: list[PrefillRequest]) -> list[PrefillResult]:
        rope_deltas = {}
        for r in requests:
            inputs = self.family.model_inputs(r.token_ids, r.grids, r.features)
            rope_deltas[r.request_id] = inputs.rope_delta
            self.engine.add_request(r.request_id, r.token_ids, r.params, inputs)
        outputs: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            outputs.update((o.request_id, o) for o in self.engine.step())
        results = []
        for r in requests:
            out = outputs[r.request_id]
            kv = None
            if not out.finished:
                kv = self.engine.kv.to_bytes(self.engine.take_prefilled(r.request_id))
            results.append(
                PrefillResult(
                    r.request_id,
                    r.token_ids + out.new_token_ids,
                    len(r.token_ids),
                    rope_deltas[r.request_id],
                    out.finished,
                    out.finish_reason,
                    kv,
                    out.logits,
                )
            )
        return results


class DecodeStage:
    def __init__(
        self,
        family: Any,
        eos_token_ids: list[int],
        config: EngineConfig | None = None,
        keep_logits: bool = False,
    ) -> None:
        self.engine = Engine(family, eos_token_ids, config, keep_logits=keep_logits)

    def add(self, result: PrefillResult, params: SamplingParams) -> None:
        if result.finished or result.kv is None:
            raise ValueError(f"{result.request_id} finished at prefill; there is nothing to decode")
        kv = self.engine.kv.from_bytes(result.kv, result.num_prompt_tokens)
        self.engine.add_prefilled(
            result.request_id, result.token_ids, result.num_prompt_tokens, params, kv, result.rope_delta
        )

    def step(self) -> list[RequestOutput]:
        return self.engine.step()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()
