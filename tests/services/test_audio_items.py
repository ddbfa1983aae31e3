"""Audio items at the stages, without a model: what an encoder checks in an audio item and how it cuts
the clip, and what a prefill instance checks in an audio reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.protocol import MMItem, MMRef, Prefill, VideoSettings
from common.sampling_params import SamplingParams
from services.encode.media_items import item_problem, prepare_item
from services.prefill.validation import KvGeometry, PrefillLimits, mm_problem
from tests.audio_helpers import wav_bytes

AUDIO_ID, TEXT_ID = 9, 3


def audio_family():
    return SimpleNamespace(modalities=("audio",), sampling_rate=16_000, preprocess_audio=len)


def test_an_audio_item_needs_a_sane_cut_and_no_video_settings() -> None:
    assert item_problem(0, MMItem(hash="a", frame=0, kind="audio", max_seconds=30.0)) is None
    assert "max_seconds must be in (0, 600]" in item_problem(0, MMItem(hash="a", kind="audio"))
    assert "max_seconds" in item_problem(0, MMItem(hash="a", kind="audio", max_seconds=float("nan")))
    bad = MMItem(hash="a", kind="audio", max_seconds=1.0, video=VideoSettings())
    assert item_problem(0, bad) == "items[0]: an audio item has no video settings"


def test_the_encoder_decodes_within_the_gateways_cut() -> None:
    fam = audio_family()
    clip = wav_bytes(1.0, rate=22_050)
    assert prepare_item(fam, MMItem(hash="a", kind="audio", max_seconds=30.0), clip) == 16_000
    with pytest.raises(ValueError, match="limit is 0.5 s"):
        prepare_item(fam, MMItem(hash="a", kind="audio", max_seconds=0.5), clip)


def test_a_model_refuses_kinds_it_does_not_take() -> None:
    with pytest.raises(ValueError, match="this model takes no image input"):
        prepare_item(audio_family(), MMItem(hash="a", kind="image"), b"")
    vision = SimpleNamespace(modalities=("image", "video"))
    with pytest.raises(ValueError, match="this model takes no audio input"):
        prepare_item(vision, MMItem(hash="a", kind="audio", max_seconds=1.0), wav_bytes(0.5))


def limits(audio: int | None) -> PrefillLimits:
    return PrefillLimits(
        vocab_size=16, max_model_len=64, image_token_id=None if audio else 7, merge_size=1 if audio else 2,
        hidden_size=None, kv=KvGeometry(16, 1, "tcp"), max_feature_bytes=1 << 20,
        audio_token_id=audio,
    )  # fmt: skip


def prefill(refs: list[MMRef], runs: list[int]) -> Prefill:
    ids = [TEXT_ID]
    for n in runs:
        ids += [AUDIO_ID] * n + [TEXT_ID]
    return Prefill(request_id="r", token_ids=ids, params=SamplingParams(), mm=refs)


def test_prefill_checks_audio_references() -> None:
    two = [MMRef(hash="a", grid_thw=(1, 1, 5), num_tokens=5, kind="audio"),
           MMRef(hash="b", grid_thw=(1, 1, 3), num_tokens=3, kind="audio")]  # fmt: skip
    assert mm_problem(prefill(two, [5, 3]), limits(AUDIO_ID)) is None
    assert mm_problem(prefill(two, [5, 3, 1]), limits(AUDIO_ID)) is None  # an `<|AUDIO|>` past them: text
    swapped = mm_problem(prefill(two, [3, 5]), limits(AUDIO_ID))
    assert "audio items' placeholder runs are not in token_ids: run 0 wants 5 placeholders" in swapped
    odd = [MMRef(hash="a", grid_thw=(1, 2, 5), num_tokens=10, kind="audio")]
    assert "grid is [1, 1, tokens]" in mm_problem(prefill(odd, [10]), limits(AUDIO_ID))
    assert mm_problem(prefill(two[:1], [5]), limits(None)) == "mm[0]: this model takes no audio"
