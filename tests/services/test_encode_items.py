"""What an encoder checks in a video item before it decodes anything: a known kind, sane settings."""

from __future__ import annotations

from common.protocol import Encode, MMItem, VideoSettings
from services.encode.worker import encode_problem


def encode(*items: MMItem) -> Encode:
    return Encode(request_id="r", items=list(items), prefill_id="P", prefill_address="tcp://p")


def test_known_kinds_with_sane_settings_pass():
    assert (
        encode_problem(
            encode(MMItem(hash="a", frame=0), MMItem(hash="b", frame=1, kind="video", video=VideoSettings())),
            2,
        )
        is None
    )


def test_a_bad_item_is_named():
    cases = [
        (MMItem(hash="a", frame=0, kind="smell"), "items[0].kind 'smell' is not one of image, video, audio"),
        (MMItem(hash="a", frame=0, kind="video"), "items[0].video: a video item needs its sampling settings"),
        (
            MMItem(hash="a", frame=0, kind="video", video=VideoSettings(fps=-1.0)),
            "items[0].video: fps must be in",
        ),
        (MMItem(hash="a", frame=0, video=VideoSettings()), "an image item has no video settings"),
    ]
    for item, words in cases:
        assert words in (encode_problem(encode(item), 1) or ""), words
