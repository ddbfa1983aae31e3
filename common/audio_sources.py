"""Where audio bytes come from: OpenAI's `input_audio` part, vLLM's `audio_url` (data URI, file:// URI
or absolute path under the allowed folders), with every size checked before decoding. What the bytes
hold is `common.audio`'s concern. No torch here: the gateway imports this.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.audio import DEFAULT_MAX_BYTES, declared_containers
from common.media import MediaError, decode_data_uri


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
    if url.startswith("data:"):
        return decode_data_uri(url, max_bytes=max_bytes)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        raise MediaError("audio URLs over http(s) are not fetched by this server; send a data: URI")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file:// URIs must name a local file, got host {parts.netloc!r}")
        return read_audio_file(
            urllib.parse.unquote(parts.path), allowed_dirs=allowed_dirs, max_bytes=max_bytes
        )
    if url.startswith("/"):
        return read_audio_file(url, allowed_dirs=allowed_dirs, max_bytes=max_bytes)
    raise MediaError("unsupported audio URL: expected a data: URI, a file:// URI or an absolute file path")


def read_audio_file(
    path: str | os.PathLike[str],
    *,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """A local file's bytes, if it lies inside `allowed_dirs` (symlinks resolved before the check).

    `None` allows any path (local tools such as the CLI); an empty list allows none. The folder check
    comes before any existence check, so a client cannot probe which files exist elsewhere.
    """
    roots = None if allowed_dirs is None else [Path(d).expanduser().resolve() for d in allowed_dirs]
    if roots == []:
        raise MediaError("local audio files are not allowed on this server; send a data: URI")
    try:
        real = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise MediaError(f"cannot resolve audio path {path}: {exc}") from None
    if roots is not None and not any(real.is_relative_to(root) for root in roots):
        raise MediaError(f"audio file {path} is outside the allowed folders")
    if not real.is_file():
        raise MediaError(f"audio file not found: {path}")
    try:
        size = real.stat().st_size
        if size > max_bytes:
            raise MediaError(f"audio is {size} bytes, limit is {max_bytes}")
        with open(real, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise MediaError(f"cannot read audio file {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # the file grew after the size check
        raise MediaError(f"audio is over the limit of {max_bytes} bytes")
    return data


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
