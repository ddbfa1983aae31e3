"""A synthetic multimodal workload: random-word prompts, random-noise PNG images, gradient MP4 videos,
tone WAV clips, fixed output lengths.

Real datasets are not at hand offline, and for comparing topologies what matters is the shape of the
load (prompt and output lengths, how many images and how large, how often an image comes back), not
the meaning of the words. Everything is drawn from one seed, so two runs (and two topologies) see the
very same requests. Counts are exact rather than drawn per request: asking for 25% text-only requests
gives round(0.25 * n) of them, so small runs still have the shape that was asked for.

Output lengths hold because each request sends `max_tokens` with `ignore_eos: true`. A repeated image
is the very same data URI as its first use, so the server's embedding cache (keyed by content hash)
can recognise it; fresh images are noise and never collide. Videos and audio clips (`media.py`) are
drawn fresh for every slot (repeats are images only); the text-only share goes without any media.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.serve.media import audio_base64, audio_problem, video_data_uri, video_problem

# A plain vocabulary: every word is one or two tokens for any byte-level BPE, so a prompt's length in
# words tracks its length in tokens.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from this be are or an it not which have one had "
    "all were when there can more their if out so up said what about into than them only other new some "
    "could time these two may then first any like now over such our man me even most made after also did "
    "many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since "
    "against go came right used take three house light water picture colour shape image window river "
    "table street garden mountain city field morning evening green blue red yellow small large round "
    "square bright dark"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    """The shape of the workload; `*_range` are relative spreads: lengths are uniform in
    [len * (1 - range), len * (1 + range)], as vLLM's `--random-range-ratio`."""

    prompt_len: int = 64  # words of text per request
    prompt_len_range: float = 0.0
    output_len: int = 64  # tokens, forced with ignore_eos
    output_len_range: float = 0.0
    images: int = 1  # per request that has images
    image_sizes: tuple[tuple[int, int], ...] = ((224, 224),)  # (width, height) choices
    text_only_fraction: float = 0.0
    repeat_image_fraction: float = 0.0  # of all image slots: reuse an image of an earlier request
    system_prompt_len: int = 0  # words of a system prompt every request shares (prefix caching)
    videos: int = 0  # per request that has media; MP4 data URIs as `video_url` parts
    video_size: tuple[int, int] = (224, 224)  # (width, height)
    video_seconds: float = 2.0
    audios: int = 0  # per request that has media; WAVs as `input_audio` parts
    audio_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError("prompt and output lengths must be at least 1")
        if self.system_prompt_len < 0:
            raise ValueError("the system prompt length must not be negative")
        if self.images < 0 or self.videos < 0 or self.audios < 0:
            raise ValueError("images, videos and audios per request must not be negative")
        problem = video_problem(*self.video_size, self.video_seconds) if self.videos else None
        problem = problem or (audio_problem(self.audio_seconds) if self.audios else None)
        if problem:
            raise ValueError(problem)
        if not self.image_sizes or any(w < 1 or h < 1 for w, h in self.image_sizes):
            raise ValueError("image sizes must be positive WIDTHxHEIGHT pairs")
        for name in ("prompt_len_range", "output_len_range"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        for name in ("text_only_fraction", "repeat_image_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


@dataclass(slots=True)
class BenchRequest:
    """One chat request of the workload, ready to send."""

    index: int
    prompt: str
    prompt_words: int
    output_len: int
    images: tuple[str, ...] = ()  # PNG data URIs; a repeat is the same string as its first use
    image_ids: tuple[int, ...] = ()  # distinct image number of each image; repeats share one
    repeated: int = 0  # how many of the images repeat one of an earlier request
    image_sizes: tuple[tuple[int, int], ...] = field(default=())
    system_prompt: str = ""  # shared by every request of the run; "" sends no system message
    videos: tuple[str, ...] = ()  # MP4 data URIs
    audios: tuple[str, ...] = ()  # base64 WAVs

    def payload(self, model: str | None) -> dict[str, Any]:
        """The JSON body: streamed, usage at the end, greedy, exactly `output_len` tokens."""
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in self.images]
        content += [{"type": "video_url", "video_url": {"url": u}} for u in self.videos]
        content += [{"type": "input_audio", "input_audio": {"data": a, "format": "wav"}} for a in self.audios]
        content.append({"type": "text", "text": self.prompt})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": self.output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if model:
            body["model"] = model
        return body


def sample_length(rng: np.random.Generator, mean: int, spread: float) -> int:
    """An integer uniform in [mean * (1 - spread), mean * (1 + spread)], at least 1."""
    if spread <= 0:
        return mean
    lo = max(1, math.floor(mean * (1 - spread)))
    hi = max(lo, math.ceil(mean * (1 + spread)))
    return int(rng.integers(lo, hi + 1))


def noise_png(width: int, height: int, rng: np.random.Generator) -> str:
    """A random-noise RGB PNG as a data URI (noise: no two images share a content hash)."""
    from PIL import Image

    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)  # noise does not compress anyway
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _repeat_slots(
    rng: np.random.Generator, image_requests: list[int], per_request: int, fraction: float
) -> set[int]:
    """Which image slots (numbered across the workload) reuse an earlier request's image.

    Only slots of requests after the first request with images can repeat: before it there is nothing
    to reuse. The count is round(fraction * all slots), capped by how many slots can repeat.
    """
    total = len(image_requests) * per_request
    eligible = list(range(per_request, total))
    count = min(len(eligible), round(fraction * total))
    if count == 0:
        return set()
    return {int(s) for s in rng.choice(eligible, size=count, replace=False)}


def build_dataset(config: DatasetConfig, num_requests: int, seed: int, stream: int = 0) -> list[BenchRequest]:
    """`num_requests` requests, the same for the same (config, seed, stream).

    `stream` gives an independent workload of the same shape from the same seed: each load point of a
    sweep uses its own, so images and prompts of one load point are never cached from the previous one.
    The system prompt is the seed's alone: one for the whole run, as a deployment's would be.
    """
    if num_requests < 0:
        raise ValueError("num_requests must not be negative")
    system = np.random.default_rng([seed & 0xFFFFFFFF, 1 << 30])
    system_prompt = (
        " ".join(system.choice(WORDS, size=config.system_prompt_len)) if config.system_prompt_len else ""
    )
    rng = np.random.default_rng([seed & 0xFFFFFFFF, stream])
    has_media = config.images or config.videos or config.audios
    n_text_only = round(config.text_only_fraction * num_requests) if has_media else num_requests
    text_only = {int(i) for i in rng.choice(num_requests, size=n_text_only, replace=False)}
    image_requests = [i for i in range(num_requests) if i not in text_only]
    repeats = _repeat_slots(rng, image_requests, config.images, config.repeat_image_fraction)

    pool: list[tuple[int, str, tuple[int, int]]] = []  # distinct images of earlier requests
    requests, slot = [], 0
    for index in range(num_requests):
        words = sample_length(rng, config.prompt_len, config.prompt_len_range)
        prompt = " ".join(rng.choice(WORDS, size=words))
        output_len = sample_length(rng, config.output_len, config.output_len_range)
        chosen: list[tuple[int, str, tuple[int, int]]] = []
        fresh: list[tuple[int, str, tuple[int, int]]] = []
        repeated = 0
        if index not in text_only:
            for _ in range(config.images):
                if slot in repeats:
                    chosen.append(pool[int(rng.integers(len(pool)))])
                    repeated += 1
                else:
                    width, height = config.image_sizes[int(rng.integers(len(config.image_sizes)))]
                    image = (len(pool) + len(fresh), noise_png(width, height, rng), (width, height))
                    fresh.append(image)
                    chosen.append(image)
                slot += 1
        videos, audios = [], []
        if index not in text_only:  # one seed per clip, drawn after the images: image runs stay as they were
            for _ in range(config.videos):
                videos.append(video_data_uri(*config.video_size, config.video_seconds, _clip_seed(rng)))
            for _ in range(config.audios):
                audios.append(audio_base64(config.audio_seconds, _clip_seed(rng)))
        pool.extend(fresh)
        requests.append(
            BenchRequest(
                index=index,
                prompt=prompt,
                prompt_words=words,
                output_len=output_len,
                images=tuple(c[1] for c in chosen),
                image_ids=tuple(c[0] for c in chosen),
                repeated=repeated,
                image_sizes=tuple(c[2] for c in chosen),
                system_prompt=system_prompt,
                videos=tuple(videos),
                audios=tuple(audios),
            )
        )
    return requests


def _clip_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 32))
