"""Image parts of a request: fetch the bytes, prove they are an image within the limits, measure it.

The encoder decodes the image again later, from the very bytes received here (they travel unchanged,
and their hash is the embedding-cache key). The gateway still decodes every image fully once, because
a refusal must come now, as a 400, not from an encoder after the request was routed, and because the
placeholder count depends on the size after the EXIF orientation is applied. This runs in a worker
thread: decoding a large image takes tens of milliseconds.

Sources: `data:` URIs; local files (an absolute path or a `file://` URI) only inside the folders the
operator allowed. Remote http(s) URLs are refused: a gateway that fetches arbitrary URLs on a client's
behalf needs its own SSRF defences, and the stages here have no way out anyway.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from common.hashing import content_hash
from common.media import MediaError, decode_data_uri, decode_image, read_local_file
from common.vision_geometry import VisionGeometry
from gateway.backend import ImageInput
from gateway.errors import bad_request


class ImageLoader:
    def __init__(
        self,
        geometry: VisionGeometry,
        *,
        max_bytes: int,
        max_pixels: int,
        allowed_dirs: Sequence[Path] = (),
    ) -> None:
        self.geometry = geometry
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.allowed_dirs = [Path(d).resolve() for d in allowed_dirs]

    def load(self, url: str, param: str) -> ImageInput:
        """Bytes, size and geometry of the image at `url`; a 400 naming `param` when it is unusable."""
        try:
            data = self._fetch(url)
            image = decode_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            width, height = image.size
            image.close()
            grid = self.geometry.grid(width, height)
        except (MediaError, ValueError) as exc:  # ValueError: an aspect ratio the model cannot take
            raise bad_request(f"{param}: {exc}", param=param) from None
        return ImageInput(
            hash=content_hash(data),
            data=data,
            width=width,
            height=height,
            grid_thw=grid,
            num_tokens=self.geometry.num_tokens(width, height),
        )

    def _fetch(self, url: str) -> bytes:
        if url.startswith("data:"):
            return decode_data_uri(url, max_bytes=self.max_bytes)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            raise MediaError("image URLs over http(s) are not fetched by this server; send a data: URI")
        if scheme == "file":
            parts = urllib.parse.urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise MediaError(f"file:// URIs must name a local file, got host {parts.netloc!r}")
            return self._read_file(urllib.parse.unquote(parts.path))
        if url.startswith("/"):
            return self._read_file(url)
        raise MediaError(
            "unsupported image URL: expected a data: URI, a file:// URI or an absolute file path"
        )

    def _read_file(self, path: str) -> bytes:
        """A local image, if it lies inside an allowed folder (`media.read_local_file`'s rules)."""
        if not self.allowed_dirs:
            raise MediaError("local image files are not allowed on this server; send a data: URI")
        if not path.startswith("/"):
            raise MediaError(f"local image paths must be absolute, got {path!r}")
        return read_local_file(path, allowed_dirs=self.allowed_dirs, max_bytes=self.max_bytes, kind="image")
