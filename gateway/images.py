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

from collections.abc import Sequence
from pathlib import Path

from common.hashing import content_hash
from common.media import MediaError, decode_image, media_url_bytes
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
        return media_url_bytes(url, kind="image", allowed_dirs=self.allowed_dirs, max_bytes=self.max_bytes)
