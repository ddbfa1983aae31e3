"""Image input: decode bytes, files and data URIs into RGB PIL images, with clear errors.

Images arrive from untrusted clients, so every limit is checked before the expensive step: the byte
size before decoding, the pixel count from the header before the pixels are decompressed, and a file's
real location (symlinks resolved) before it is opened. Each failure is a `MediaError` (a `ValueError`)
whose message can go back to the client as a 400. No torch here: the gateway imports this.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
# Formats decoded by Pillow itself; others (EPS, for one) may call outside programs.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class MediaError(ValueError):
    """An image input that cannot be used; the message says why, in terms a client can act on."""


def decode_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode image bytes to an RGB image, applying the EXIF orientation.

    Transparency is composited onto white, as transformers' `convert_to_rgb` does, so the encoder
    sees the same pixels whichever side converts. An animated image gives its first frame.
    """
    if len(data) > max_bytes:
        raise MediaError(f"image is {len(data)} bytes, limit is {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise MediaError(f"not an image (supported formats: {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image is larger than the limit of {max_pixels} pixels ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"image is {width}x{height}, limit is {max_pixels} pixels")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise MediaError(f"image data is corrupt: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image_path(
    path: str | os.PathLike[str],
    *,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load a local image file, refusing paths outside `allowed_dirs`.

    The path is resolved (symlinks and `..` included) before the check, so a link inside an allowed
    folder cannot point outside it. `allowed_dirs=None` (the default) means no restriction, for local
    tools such as the CLI; a server must pass its folders. An empty list allows nothing.
    """
    data = read_local_file(path, allowed_dirs=allowed_dirs, max_bytes=max_bytes, kind="image")
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)


def read_local_file(
    path: str | os.PathLike[str],
    *,
    allowed_dirs: Iterable[str | os.PathLike[str]] | None,
    max_bytes: int,
    kind: str,
) -> bytes:
    """The bytes of a local media file (`kind`: image, audio, video), if it lies inside `allowed_dirs`.

    The path is resolved (symlinks and `..` included) before the folder check, so a link inside an
    allowed folder cannot point outside it, and the folder check comes before any existence check, so
    a client cannot probe which files exist elsewhere. `None` means no restriction (local tools such
    as the CLI); an empty list allows nothing. At most `max_bytes + 1` bytes are read.
    """
    try:
        real = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise MediaError(f"cannot resolve {kind} path {path}: {exc}") from None
    if allowed_dirs is not None:
        roots = [Path(d).expanduser().resolve() for d in allowed_dirs]
        if not any(real.is_relative_to(root) for root in roots):
            raise MediaError(f"{kind} file {path} is outside the allowed folders")
    try:
        if not real.exists():
            raise MediaError(f"{kind} file not found: {path}")
        if not real.is_file():
            raise MediaError(f"{kind} path is not a file: {path}")
        size = real.stat().st_size
        if size > max_bytes:
            raise MediaError(f"{kind} is {size} bytes, limit is {max_bytes}")
        with open(real, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:  # permission denied on the file or a parent
        raise MediaError(f"cannot read {kind} file {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # the file grew after the size check
        raise MediaError(f"{kind} is over the limit of {max_bytes} bytes")
    return data


def decode_data_uri(uri: str, *, max_bytes: int | None = None) -> bytes:
    """The payload of a `data:[<type>][;base64],<data>` URI.

    `max_bytes`, when given, is checked against the encoded length first, so a huge URI is refused
    without decoding it, then against the decoded bytes. Whitespace inside base64 (line-wrapped encoders) is ignored.
    """
    if not uri.startswith("data:"):
        raise MediaError("malformed data URI: it must start with 'data:'")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise MediaError("malformed data URI: no ',' between the header and the data")
    is_base64 = header.split(";")[-1].strip().lower() == "base64"
    if max_bytes is not None:
        # base64 takes 4 characters per 3 bytes (plus slack for line breaks), %XX at most 3 per byte
        longest = max_bytes * 3 // 2 + 16 if is_base64 else max_bytes * 3
        if len(payload) > longest:
            raise MediaError(
                f"data URI is {len(payload)} characters, too long for the limit of {max_bytes} bytes"
            )
    if not is_base64:
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        compact = "".join(payload.split())
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"broken base64 in data URI: {exc}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise MediaError(f"data URI holds {len(data)} bytes, limit is {max_bytes}")
    return data


def media_url_bytes(
    url: str, *, kind: str, allowed_dirs: Iterable[str | os.PathLike[str]] | None, max_bytes: int
) -> bytes:
    """The bytes behind a media part's URL (`kind`: image, video, audio): a `data:` URI, a `file://`
    URI or an absolute path (the local file under `read_local_file`'s rules; `None` allows any, an
    empty list none). Remote URLs are refused: fetching them for a client needs SSRF defences."""
    if url.startswith("data:"):
        return decode_data_uri(url, max_bytes=max_bytes)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        raise MediaError(f"{kind} URLs over http(s) are not fetched by this server; send a data: URI")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file:// URIs must name a local file, got host {parts.netloc!r}")
        path = urllib.parse.unquote(parts.path)
    elif url.startswith("/"):
        path = url
    else:
        raise MediaError(
            f"unsupported {kind} URL: expected a data: URI, a file:// URI or an absolute file path"
        )
    roots = None if allowed_dirs is None else list(allowed_dirs)
    if roots == []:
        raise MediaError(f"local {kind} files are not allowed on this server; send a data: URI")
    return read_local_file(path, allowed_dirs=roots, max_bytes=max_bytes, kind=kind)
