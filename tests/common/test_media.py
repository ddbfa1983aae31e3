"""Image loading: decoded images are RGB, and every refusal says why."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common.media import MediaError, decode_data_uri, decode_image, load_image_path


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png(width: int = 40, height: int = 30, colour=(200, 10, 10)) -> bytes:
    return _encode(Image.new("RGB", (width, height), colour))


def test_decode_png_and_jpeg_to_rgb() -> None:
    image = decode_image(_png())
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (40, 30), (200, 10, 10))
    gray_jpeg = _encode(Image.new("L", (16, 8), 128), "JPEG")
    image = decode_image(gray_jpeg)
    assert (image.mode, image.size) == ("RGB", (16, 8))


def test_transparency_goes_onto_white() -> None:
    image = decode_image(_encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0))))
    assert (image.mode, image.getpixel((1, 1))) == ("RGB", (255, 255, 255))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif)
    assert decode_image(data).size == (20, 40)


def test_limits() -> None:
    data = _png(100, 100)
    with pytest.raises(MediaError, match=rf"image is {len(data)} bytes, limit is 50"):
        decode_image(data, max_bytes=50)
    with pytest.raises(MediaError, match="image is 100x100, limit is 5000 pixels"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_not_an_image_or_corrupt() -> None:
    with pytest.raises(MediaError, match="not an image"):
        decode_image(b"hello, this is text")
    with pytest.raises(MediaError, match="not an image"):
        decode_image(b"")
    truncated = _encode(Image.effect_noise((64, 64), 50).convert("RGB"))[:200]
    with pytest.raises(MediaError, match="corrupt"):
        decode_image(truncated)
    assert issubclass(MediaError, ValueError)


def test_load_image_path(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "a.png").write_bytes(_png())
    assert load_image_path(allowed / "a.png", allowed_dirs=[allowed]).size == (40, 30)
    assert load_image_path(str(allowed / "sub" / ".." / "a.png"), allowed_dirs=None).size == (40, 30)
    with pytest.raises(MediaError, match="not found"):
        load_image_path(allowed / "missing.png", allowed_dirs=[allowed])
    with pytest.raises(MediaError, match="not a file"):
        load_image_path(allowed, allowed_dirs=[tmp_path])
    with pytest.raises(MediaError, match="limit is 10"):
        load_image_path(allowed / "a.png", allowed_dirs=[allowed], max_bytes=10)


def test_load_image_path_stays_inside_allowed_dirs(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "images", tmp_path / "secret"
    allowed.mkdir()
    outside.mkdir()
    (outside / "b.png").write_bytes(_png())
    (allowed / "link.png").symlink_to(outside / "b.png")
    for path in (outside / "b.png", allowed / "link.png", allowed / ".." / "secret" / "b.png"):
        with pytest.raises(MediaError, match="outside the allowed folders"):
            load_image_path(path, allowed_dirs=[allowed])
    with pytest.raises(MediaError, match="outside the allowed folders"):
        load_image_path(outside / "b.png", allowed_dirs=[])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    path.write_bytes(_png())
    path.chmod(0)
    with pytest.raises(MediaError, match="cannot read"):
        load_image_path(path, allowed_dirs=[tmp_path])


def test_read_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import common.media as media

    path = tmp_path / "d.png"
    path.write_bytes(_png())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(media, "open", denied, raising=False)
    with pytest.raises(MediaError, match="cannot read image file .*Permission denied"):
        load_image_path(path, allowed_dirs=[tmp_path])


def test_data_uri() -> None:
    data = _png()
    encoded = base64.b64encode(data).decode()
    assert decode_data_uri(f"data:image/png;base64,{encoded}") == data
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert decode_data_uri(f"data:image/png;base64,{wrapped}") == data
    assert decode_data_uri("data:,hello%20world") == b"hello world"
    assert decode_image(decode_data_uri(f"data:;base64,{encoded}")).size == (40, 30)


def test_data_uri_errors() -> None:
    with pytest.raises(MediaError, match="must start with 'data:'"):
        decode_data_uri("http://example.com/a.png")
    with pytest.raises(MediaError, match="no ','"):
        decode_data_uri("data:image/png;base64")
    with pytest.raises(MediaError, match="broken base64"):
        decode_data_uri("data:image/png;base64,abc$%^")
    with pytest.raises(MediaError, match="broken base64"):
        decode_data_uri("data:image/png;base64,abcde")
    big = base64.b64encode(b"x" * 3000).decode()
    with pytest.raises(MediaError, match="too long for the limit of 1000 bytes"):
        decode_data_uri(f"data:image/png;base64,{big}", max_bytes=1000)
    with pytest.raises(MediaError, match="holds 3000 bytes, limit is 2999"):
        decode_data_uri(f"data:image/png;base64,{big}", max_bytes=2999)


def test_imports_no_torch() -> None:
    code = "import sys, json; import common.media; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False
