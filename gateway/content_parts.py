"""Chat content parts: text, `image_url`, `video_url` (vLLM's and SGLang's name for a video part),
`input_audio` (OpenAI's audio part) and `audio_url` (vLLM's).

Each part is checked for its shape here, naming the field at fault, and reduced to what the chat
template sees: `{"type": "text", "text"}`, `{"type": "image"}`, `{"type": "video"}` or
`{"type": "audio"}` (Qwen's templates render an image or video as one `<|image_pad|>` /
`<|video_pad|>` between vision markers, Qwen2-Audio's an audio part as
`Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>`). The media sources are kept in prompt order with their
kind and field path; fetching and checking the bytes is `gateway.images` / `gateway.videos` /
`gateway.audios`' work, later, off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.errors import bad_request

PART_TYPES = ("text", "image_url", "video_url", "input_audio", "audio_url")
_MEDIA_PARTS = {"image_url": "image", "video_url": "video", "audio_url": "audio"}  # part type -> kind


@dataclass(slots=True)
class ChatPrompt:
    """The messages as the chat template sees them, and the media in prompt order."""

    messages: list[dict[str, Any]]
    # (kind, source, param): source is a URL, or an `input_audio` object ({"data", "format"})
    media: list[tuple[str, Any, str]] = field(default_factory=list)

    @property
    def image_urls(self) -> list[tuple[str, str]]:
        """(url, param) of the images, in prompt order."""
        return [(url, param) for kind, url, param in self.media if kind == "image"]

    def count(self, kind: str) -> int:
        return sum(k == kind for k, _, _ in self.media)


def content_part(part: Any, where: str, prompt: ChatPrompt) -> dict[str, Any]:
    """The template's view of one part; a media part's source joins `prompt.media`."""
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object with a 'type', got {type(part).__name__}", param=where)
    kind = part.get("type")
    if not isinstance(kind, str):
        raise bad_request(f"{where}.type must be a string, got {type(kind).__name__}", param=f"{where}.type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text must be a string", param=f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict):
            raise bad_request(
                f"{where}.input_audio must be an object with 'data' (base64) and 'format'",
                param=f"{where}.input_audio",
            )
        prompt.media.append(("audio", audio, f"{where}.input_audio"))
        return {"type": "audio"}
    if kind in _MEDIA_PARTS:
        media = part.get(kind)
        url = media.get("url") if isinstance(media, dict) else media
        if not isinstance(url, str) or not url:
            raise bad_request(
                f"{where}.{kind} must be an object with a non-empty string 'url'", param=f"{where}.{kind}"
            )
        prompt.media.append((_MEDIA_PARTS[kind], url, f"{where}.{kind}.url"))
        return {"type": _MEDIA_PARTS[kind]}
    raise bad_request(
        f"{where}.type {kind!r} is not supported; supported content part types: {', '.join(PART_TYPES)}",
        param=f"{where}.type",
    )
