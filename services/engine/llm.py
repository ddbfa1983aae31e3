"""The monolithic path in one object: prompt and images in, text out.

`LLM` prepares a request (chat template, placeholder expansion, image preprocessing, encoder), feeds
the engine and drives it until every request is done, detokenizing as it goes so stop strings end a
request at once. It is what `epd-serve generate` and the benchmarks call; the services split the same
steps across processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.detokenizer import IncrementalDetokenizer
from common.hashing import content_hash
from common.prompting import chat_prompt_ids
from common.sampling_params import SamplingParams
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.inputs import ModelInputs
from services.engine.sequence import FinishReason
from services.models.loader import LoadedModel, load_model


@dataclass(slots=True)
class PreparedRequest:
    token_ids: list[int]
    inputs: ModelInputs
    mm_items: list[tuple[str, int]] = field(default_factory=list)  # (content hash, tokens) per image


@dataclass(slots=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    logits: list[Any] = field(default_factory=list)


class LLM:
    def __init__(
        self,
        model: str | Path | LoadedModel,
        config: EngineConfig | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        keep_logits: bool = False,
    ) -> None:
        self.model = (
            model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        )
        self.family = self.model.family
        self.tokenizer = self.model.tokenizer
        self.engine = Engine(self.family, self.model.eos_token_ids, config, keep_logits=keep_logits)
        self._live: dict[str, tuple[IncrementalDetokenizer, Completion]] = {}
        self._count = 0

    def prepare(self, prompt: str, images: list[Any] = ()) -> PreparedRequest:
        """Chat-template `prompt` after `images` (PIL images), expand placeholders, run the encoder."""
        items = [self.family.preprocess(img) for img in images]
        counts = [self.family.num_image_tokens(i) for i in items]
        ids = chat_prompt_ids(self.tokenizer, prompt, self.family.image_token_id, counts)
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"the prompt takes {len(ids)} tokens; the model's context is {limit} tokens")
        features = self.family.encode(items)
        inputs = self.family.model_inputs(ids, [i.grid_thw for i in items], features)
        keys = [_image_key(img) for img in images]
        return PreparedRequest(ids, inputs, list(zip(keys, counts, strict=True)))

    def submit(self, request: PreparedRequest, params: SamplingParams, request_id: str | None = None) -> str:
        request_id = request_id or f"req-{self._count}"
        self._count += 1
        self.engine.add_request(request_id, request.token_ids, params, request.inputs, request.mm_items)
        completion = Completion(request_id, "", [], "", len(request.token_ids))
        self._live[request_id] = (IncrementalDetokenizer(self.tokenizer, params.stop), completion)
        return request_id

    def step(self) -> list[Completion]:
        """One engine step; returns the requests that finished in it."""
        done = []
        for out in self.engine.step():
            detok, completion = self._live[out.request_id]
            completion.token_ids.extend(out.new_token_ids)
            if out.logits is not None:
                completion.logits.append(out.logits)
            finished, reason = out.finished, out.finish_reason
            # text is needed as it grows only to catch stop strings; otherwise decode once at the end
            if detok.stop and detok.push(out.new_token_ids) and not finished:
                self.engine.finish(out.request_id, FinishReason.STOP)
                finished, reason = True, FinishReason.STOP.value
            if finished:
                if not detok.stop:
                    detok.push(completion.token_ids)
                completion.text = detok.text
                completion.finish_reason = reason or FinishReason.STOP.value
                del self._live[out.request_id]
                done.append(completion)
        return done

    def run(self) -> list[Completion]:
        done: list[Completion] = []
        while self.engine.has_unfinished():
            done.extend(self.step())
        return done

    def generate(
        self, prompt: str, images: list[Any] = (), params: SamplingParams | None = None
    ) -> Completion:
        request_id = self.submit(self.prepare(prompt, images), params or SamplingParams())
        return next(c for c in self.run() if c.request_id == request_id)


def _image_key(image: Any) -> str:
    """A content key of a decoded image (the services key the file's bytes, which this path lacks)."""
    head = f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode()
    return content_hash(head + image.tobytes())
