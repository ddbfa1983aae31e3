"""The synthetic workload: the same for the same seed, and the shape that was asked for."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from bench.serve.dataset import DatasetConfig, build_dataset


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_same_seed_same_requests_other_seed_or_stream_other_requests():
    config = DatasetConfig(prompt_len=20, prompt_len_range=0.5, output_len=16, output_len_range=0.5,
                           images=2, image_sizes=((56, 56), (84, 56)), repeat_image_fraction=0.3)  # fmt: skip
    a, b = build_dataset(config, 12, seed=3), build_dataset(config, 12, seed=3)
    assert [r.payload("m") for r in a] == [r.payload("m") for r in b]
    other_seed = build_dataset(config, 12, seed=4)
    other_stream = build_dataset(config, 12, seed=3, stream=1)
    assert [r.prompt for r in a] != [r.prompt for r in other_seed]
    assert set(a[0].images).isdisjoint(r.images[0] for r in other_stream)


def test_lengths_sizes_and_payload():
    config = DatasetConfig(prompt_len=40, prompt_len_range=0.25, output_len=32, output_len_range=0.5,
                           images=1, image_sizes=((56, 56), (112, 84)))  # fmt: skip
    requests = build_dataset(config, 60, seed=0)
    assert all(30 <= r.prompt_words <= 50 and len(r.prompt.split()) == r.prompt_words for r in requests)
    assert all(16 <= r.output_len <= 48 for r in requests)
    assert len({r.output_len for r in requests}) > 5  # spread, not a constant
    assert {decode(r.images[0]).size for r in requests} == {(56, 56), (112, 84)}
    body = requests[0].payload("qwen")
    assert body["max_tokens"] == requests[0].output_len and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "qwen" and "model" not in requests[0].payload(None)
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    fixed = build_dataset(DatasetConfig(prompt_len=7, output_len=5), 5, seed=1)
    assert {(r.prompt_words, r.output_len) for r in fixed} == {(7, 5)}


@pytest.mark.parametrize(("n", "text_only", "repeat"), [(40, 0.25, 0.5), (10, 0.0, 0.0), (20, 1.0, 0.5)])
def test_text_only_and_repeated_image_fractions(n, text_only, repeat):
    config = DatasetConfig(prompt_len=5, output_len=4, images=2, image_sizes=((56, 56),),
                           text_only_fraction=text_only, repeat_image_fraction=repeat)  # fmt: skip
    requests = build_dataset(config, n, seed=7)
    with_images = [r for r in requests if r.images]
    assert len(requests) - len(with_images) == round(text_only * n)
    assert all(len(r.images) == 2 for r in with_images)
    slots = 2 * len(with_images)
    repeated = sum(r.repeated for r in requests)
    assert repeated == min(round(repeat * slots), max(0, slots - 2))
    # a repeat is byte-identical to an image of an earlier request; fresh images are all distinct
    seen: dict[str, int] = {}
    fresh = 0
    for r in requests:
        for uri, image_id in zip(r.images, r.image_ids, strict=True):
            if uri in seen:
                assert seen[uri] == image_id
            else:
                fresh += 1
                seen[uri] = image_id
    assert fresh == slots - repeated == len(seen)
    for i, r in enumerate(with_images[1:], start=1):
        earlier = {u for q in with_images[:i] for u in q.images}
        assert sum(u in earlier for u in r.images) >= r.repeated


def test_bad_shapes_are_refused():
    for bad in [
        dict(prompt_len=0),
        dict(text_only_fraction=1.5),
        dict(prompt_len_range=1.0),
        dict(image_sizes=()),
    ]:
        with pytest.raises(ValueError):
            DatasetConfig(**bad)


def test_a_system_prompt_is_shared_by_every_request_of_every_stream():
    config = DatasetConfig(
        prompt_len=10, output_len=4, images=1, image_sizes=((56, 56),), system_prompt_len=30
    )
    first, later = build_dataset(config, 4, seed=2), build_dataset(config, 4, seed=2, stream=3)
    systems = {r.payload(None)["messages"][0]["content"] for r in first + later}
    assert len(systems) == 1 and len(systems.pop().split()) == 30
    assert all(r.payload(None)["messages"][0]["role"] == "system" for r in first)
    assert [m["role"] for m in build_dataset(DatasetConfig(), 1, seed=2)[0].payload(None)["messages"]] == [
        "user"
    ]
    with pytest.raises(ValueError, match="system prompt"):
        DatasetConfig(system_prompt_len=-1)
