"""From a checked OpenAI request to a `GenerateRequest`: media, chat template, placeholders, lengths.

This is the blocking part of a request (image and audio decoding, video probing, template rendering,
tokenizing a long prompt), so the app runs it in a worker thread and the event loop keeps streaming
other requests' tokens. The prompt is rendered with one `<|image_pad|>` per image, one `<|video_pad|>`
per video and one `<|AUDIO|>` per audio clip, then each is expanded to the item's token count (an
image's from its size alone, a video's from its frame plan: gateway.videos, a clip's from its decoded
length: gateway.audios), and only then is the context length checked: media tokens count.

A checkpoint takes images and videos (Qwen2-VL) or audio (Qwen2-Audio: `audio_token_index` in its
config); a part of a kind it does not take is a 400 naming the part, before any byte is fetched.

Everything cheap comes first, so a refused request costs next to nothing: the sampling fields and
the prompt's length in characters (`gateway.request_limits`) are checked before any image is decoded
or any text rendered and tokenized; a prompt too long in characters is never tokenized at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.audio_features import AudioGeometry
from common.placeholder_runs import expand_items
from common.qwen3_vl_sampling import Qwen3VLVideoSampling
from common.qwen3_vl_video import video_prompt_ids
from common.sampling_params import SamplingParams
from common.tokenizer import ChatTemplateError, TextTokenizer
from common.video_sampling import VIDEO_PREPROCESSOR_CONFIG, VideoSampling
from common.vision_geometry import PREPROCESSOR_CONFIG, VisionGeometry
from gateway.audios import AudioLoader
from gateway.backend import GenerateRequest, ImageInput
from gateway.config import GatewayConfig, video_limits
from gateway.errors import bad_request
from gateway.images import ImageLoader
from gateway.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_prompt,
    check_sampling_fields,
    context_full,
    sampling_params,
)
from gateway.request_limits import chat_text_chars, check_prompt_chars
from gateway.videos import VideoLoader

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
AUDIO_TOKEN = "<|AUDIO|>"
KINDS = ("image", "video", "audio")
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k")


class Preprocessor:
    """Builds `GenerateRequest`s for one checkpoint; thread-safe (it keeps no per-request state)."""

    def __init__(self, config: GatewayConfig, tokenizer: TextTokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        model_config = _read_json(config.model_dir / "config.json")
        # An audio model (Qwen2-Audio: `audio_token_index` in its config) takes audio only; its
        # preprocessor config is a Whisper feature extractor's, not an image processor's.
        audio_model = isinstance(model_config.get("audio_token_index"), int)
        self.image_token_id = self.video_token_id = self.audio_token_id = None
        if audio_model:
            self.audio_token_id = _token_id(model_config, "audio_token_index", AUDIO_TOKEN, tokenizer)
        else:
            self.image_token_id = _token_id(model_config, "image_token_id", IMAGE_TOKEN, tokenizer)
            self.video_token_id = _token_id(model_config, "video_token_id", VIDEO_TOKEN, tokenizer)
        self.images: ImageLoader | None = None
        self.videos: VideoLoader | None = None
        self.audios: AudioLoader | None = None
        if audio_model and (config.model_dir / PREPROCESSOR_CONFIG).is_file():
            self.audios = AudioLoader(
                AudioGeometry.from_dir(config.model_dir),
                max_bytes=config.max_audio_bytes,
                max_seconds=config.max_audio_seconds,
                allowed_dirs=config.allowed_local_media_dirs,
            )
        if (config.model_dir / PREPROCESSOR_CONFIG).is_file() and self.image_token_id is not None:
            self.images = ImageLoader(
                VisionGeometry.from_dir(config.model_dir),
                max_bytes=config.max_image_bytes,
                max_pixels=config.max_image_pixels,
                allowed_dirs=config.allowed_local_media_dirs,
            )
        # a vision model: videos too. Qwen3-VL samples and resizes with its own rules, and its prompt
        # puts a timestamp before each temporal patch's run of pads (docs/qwen3_vl.md)
        self.video_stamps: tuple[int, int] | None = None  # (vision_start, vision_end) ids: Qwen3-VL
        if self.images is not None and self.video_token_id is not None:
            video_config = _read_json(config.model_dir / VIDEO_PREPROCESSOR_CONFIG)  # else Qwen's defaults
            rule: type[VideoSampling] = VideoSampling
            if model_config.get("model_type") == "qwen3_vl":
                rule = Qwen3VLVideoSampling
                start = _token_id(model_config, "vision_start_token_id", "<|vision_start|>", tokenizer)
                end = _token_id(model_config, "vision_end_token_id", "<|vision_end|>", tokenizer)
                self.video_stamps = None if start is None or end is None else (start, end)
            if rule is VideoSampling or self.video_stamps is not None:  # else videos are refused
                self.videos = VideoLoader(
                    rule.from_config(video_config), video_limits(config), config.allowed_local_media_dirs
                )
        self.sampling_defaults = _sampling_defaults(_read_json(config.model_dir / "generation_config.json"))

    def chat(self, request: ChatCompletionRequest, request_id: str, max_model_len: int) -> GenerateRequest:
        c = self.config
        prompt = chat_prompt(
            request, c.max_images_per_request, c.max_videos_per_request, c.max_audios_per_request
        )
        check_sampling_fields(request, self.tokenizer.vocab_size, self.sampling_defaults)  # before media
        self._check_chars(chat_text_chars(prompt.messages), max_model_len, "messages")
        loaders = {"image": self.images, "video": self.videos, "audio": self.audios}
        for kind, _, param in prompt.media:  # before any byte is fetched
            if loaders[kind] is None:
                raise bad_request(f"{param}: {self._refusal(kind)}", param=param)
        media = [loaders[kind].load(src, param) for kind, src, param in prompt.media]  # type: ignore[union-attr]
        try:
            token_ids = self.tokenizer.render_chat_ids(prompt.messages)
        except ChatTemplateError as exc:
            raise bad_request(str(exc), param="messages") from None
        token_ids = self._expand(token_ids, media, "messages")
        params = self._sampling(request, len(token_ids), max_model_len)
        return GenerateRequest(request_id=request_id, token_ids=token_ids, images=media, params=params)

    def completion(self, request: CompletionRequest, request_id: str, max_model_len: int) -> GenerateRequest:
        check_sampling_fields(request, self.tokenizer.vocab_size, self.sampling_defaults)  # before tokenizing
        token_ids = self._completion_prompt(request.prompt, max_model_len)
        if not token_ids:
            raise bad_request("'prompt' must not be empty", param="prompt")
        token_ids = self._expand(token_ids, [], "prompt")
        params = self._sampling(request, len(token_ids), max_model_len)
        return GenerateRequest(request_id=request_id, token_ids=token_ids, images=[], params=params)

    def _completion_prompt(self, prompt: Any, max_model_len: int) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            self._check_chars(len(prompt), max_model_len, "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list) and prompt and type(prompt[0]) is int and len(prompt) >= max_model_len:
            raise context_full(len(prompt), max_model_len, "prompt")  # before looking at each id
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            vocab = self.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise bad_request(f"'prompt' token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        raise bad_request(
            "'prompt' must be a string, a list of one string or a list of token ids "
            "(batched prompts are not supported)",
            param="prompt",
        )

    def _refusal(self, kind: str) -> str:
        """Why a part of `kind` cannot be served, naming what the model does take."""
        loaders = {"image": self.images, "video": self.videos, "audio": self.audios}
        takes = [k for k in KINDS if loaders[k] is not None]
        noun = {"image": "images", "video": "videos", "audio": "audio"}
        accepted = " and ".join(noun[k] for k in takes) if takes else "text only"
        return f"this model does not take {noun[kind]} (it takes {accepted})"

    def _check_chars(self, chars: int, max_model_len: int, param: str) -> None:
        check_prompt_chars(
            chars,
            max_model_len=max_model_len,
            chars_per_token=self.config.max_prompt_chars_per_token,
            param=param,
        )

    def _expand(self, token_ids: list[int], media: list[ImageInput], param: str) -> list[int]:
        """Each kind's placeholders, one per item of that kind, expanded to the item's token count.

        As vLLM serves them, the first placeholders of a kind are its items'; one more typed in the
        text (random or pasted text may hold a literal `<|image_pad|>`), or any of a kind the request
        has no items of, is an ordinary token: no features, a text M-RoPE position
        (common/placeholder_runs.py)."""
        pads = (
            ("image", self.image_token_id),
            ("video", self.video_token_id),
            ("audio", self.audio_token_id),
        )
        for kind, pad in pads:
            counts = [item.num_tokens for item in media if item.kind == kind]
            if pad is None or not counts:
                continue
            if kind == "video" and self.video_stamps is not None:
                runs = self._video_runs(media)
            else:
                runs = [[pad] * n for n in counts]
            try:
                token_ids = expand_items(token_ids, pad, runs)
            except ValueError:
                noun = "audio clips" if kind == "audio" else f"{kind}s"
                raise bad_request(
                    f"the prompt has {token_ids.count(pad)} {kind} placeholder tokens but the request has "
                    f"{len(counts)} {noun} (the chat template writes one per item)",
                    param=param,
                ) from None
        return token_ids

    def _video_runs(self, media: list[ImageInput]) -> list[list[int]]:
        """Each video's ids as `Qwen3VLProcessor` writes them: per temporal patch, its timestamp and
        `<|vision_start|>` pads `<|vision_end|>`."""
        assert self.video_stamps is not None and self.videos is not None and self.video_token_id is not None
        start, end = self.video_stamps
        merge = self.videos.sampling.merge_size
        return [
            video_prompt_ids(
                self.tokenizer.encode,
                item.timestamps,
                item.grid_thw[1] * item.grid_thw[2] // merge**2,
                self.video_token_id,
                start,
                end,
            )  # fmt: skip
            for item in media
            if item.kind == "video"
        ]

    def _sampling(self, request: Any, prompt_len: int, max_model_len: int) -> SamplingParams:
        return sampling_params(
            request,
            prompt_len=prompt_len,
            max_model_len=max_model_len,
            default_max_tokens=self.config.default_max_tokens,
            vocab_size=self.tokenizer.vocab_size,
            defaults=self.sampling_defaults,
        )


def _token_id(model_config: dict[str, Any], key: str, token: str, tokenizer: TextTokenizer) -> int | None:
    """A placeholder's id from the model's config, else from the tokenizer; None: no such input."""
    value = model_config.get(key)
    if isinstance(value, int):
        return value
    try:
        return tokenizer.token_id(token)
    except KeyError:
        return None


def _sampling_defaults(generation: dict[str, Any]) -> dict[str, Any]:
    """Defaults for fields a request leaves out, from the checkpoint's generation config (as vLLM).

    A config that says `do_sample: false` (and names no temperature) asks for greedy decoding, as
    transformers' `generate` would do with it, so the default temperature is then 0.
    """
    defaults = {k: generation[k] for k in SAMPLING_DEFAULT_KEYS if _finite_number(generation.get(k))}
    if generation.get("do_sample") is False and "temperature" not in defaults:
        defaults["temperature"] = 0.0
    return defaults


def _finite_number(value: Any) -> bool:
    """A usable default: a checkpoint's config is JSON too, and may hold null, a string or NaN."""
    return type(value) in (int, float) and math.isfinite(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}
