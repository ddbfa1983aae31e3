"""Where audio bytes come from: OpenAI's `input_audio` part, vLLM's `audio_url` (data URI, file:// URI
or absolute path under the allowed folders), with every size checked before decoding. What the bytes
hold is `common.audio`'s concern. No torch here: the gateway imports this.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping
from typing import Any

from common.audio import DEFAULT_MAX_BYTES, declared_containers
from common.media import MediaError, decode_data_uri, media_url_bytes, read_local_file


def input_audio_bytes(
    input_audio: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[bytes, str]:
    """The bytes and declared format of an OpenAI `input_audio` object: `{"data", "format"}`.

    The format name is checked before the base64 is decoded. `data` is plain base64; a whole data URI
    is accepted too, since some clients send one there.
    """
    data, declared = input_audio.get("data"), input_audio.get("format")
    if not isinstance(declared, str):
        raise MediaError("input_audio.format must be a string such as 'wav' or 'mp3'")
    declared_containers(declared)
    if not isinstance(data, str):
        raise MediaError("input_audio.data must be a base64 string")
    if data.startswith("data:"):
        return decode_data_uri(data, max_bytes=max_bytes), declared
    return _decode_base64(data, max_bytes), declared


def audio_url_bytes(
    url: str, *, allowed_dirs: Iterable[str | os.PathLike[str]], max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The bytes behind an `audio_url`: a data URI, a `file://` URI or an absolute path.

    A data URI's media type is not checked (tools write `application/octet-stream`, `audio/x-wav`
    and more); the bytes are. Remote URLs are refused: fetching them needs SSRF defences.
    """
    return media_url_bytes(url, kind="audio", allowed_dirs=allowed_dirs, max_bytes=max_bytes)


def read_audio_file(
    path: str | os.PathLike[str],
    *,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """A local audio file's bytes under `media.read_local_file`'s rules; an empty `allowed_dirs` is
    refused by name, since no path can pass it."""
    roots = None if allowed_dirs is None else list(allowed_dirs)
    if roots == []:
        raise MediaError("local audio files are not allowed on this server; send a data: URI")
    return read_local_file(path, allowed_dirs=roots, max_bytes=max_bytes, kind="audio")


def _decode_base64(text: str, max_bytes: int) -> bytes:
    """Strict base64 (line breaks allowed), its length checked before and after decoding."""
    if len(text) > max_bytes * 3 // 2 + 16:
        raise MediaError(
            f"input_audio.data is {len(text)} characters, too long for the limit of {max_bytes} bytes"
        )
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"input_audio.data is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise MediaError(f"audio is {len(data)} bytes, limit is {max_bytes}")
    return data
