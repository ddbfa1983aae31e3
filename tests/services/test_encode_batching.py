"""The encoder batches queued items of every kind under one budget of encoder output tokens.

A real tiny Qwen2-VL vision tower encodes images and a video; the worker is driven by hand (no
sockets): what matters is which items go into each encoder call, that an item deferred by the budget
is not decoded twice, and that batching does not change a feature.
"""

from __future__ import annotations

import io

import pytest
import torch

from common.dataplane import create_dataplane
from common.protocol import Encode, MMItem
from common.video_plan import settings_of
from services.encode import worker as worker_module
from services.encode.worker import EncodeWorker
from services.models.loader import load_model
from tests.reference import make_image
from tests.video_helpers import make_video


class _IO:
    address = "E"

    def __init__(self):
        self.sent = []

    def send(self, address, msg, buffers=()):
        self.sent.append(msg)

    def to_gateway(self, msg, buffers=()):
        raise AssertionError(f"nothing here should fail: {msg}")

    def wake(self, *_):
        pass


class _Frame:
    def __init__(self, data: bytes):
        self.buffer = memoryview(data)


def _png(size: int, seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(size, size, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def family(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl).family


def _worker(family, budget: int, calls: list[list[int]]) -> EncodeWorker:
    worker = EncodeWorker(family, _IO(), create_dataplane("fake"), max_batch_tokens=budget)
    encode = family.encode

    def recording(items):
        calls.append([family.num_image_tokens(it) for it in items])
        return encode(items)

    worker.family = type("Recording", (), {})()  # the family, with encode calls recorded
    for name in ("modalities", "preprocess", "preprocess_video", "num_image_tokens", "video_sampling"):
        setattr(worker.family, name, getattr(family, name))
    worker.family.encode = recording
    return worker


def _queue(worker: EncodeWorker, items: list[tuple[str, bytes, str]]) -> None:
    for i, (hash_, data, kind) in enumerate(items):
        video = settings_of(worker.family.video_sampling) if kind == "video" else None
        spec = MMItem(hash=hash_, frame=0, kind=kind, video=video)
        msg = Encode(request_id=f"r{i}", items=[spec], prefill_id="P", prefill_address="P")
        worker.on_encode(msg, [_Frame(data)])


def _features(worker: EncodeWorker, hashes: str) -> dict[str, torch.Tensor | None]:
    return {h: worker.cache.get(h) for h in hashes}


def test_mixed_items_share_one_budget_in_queue_order(family, monkeypatch):
    items = [
        ("a", _png(56, 1), "image"),  # 4 tokens each at 56 x 56 (the tiny model's geometry)
        ("v", make_video(count=8), "video"),
        ("b", _png(112, 2), "image"),
        ("c", _png(56, 3), "image"),
    ]
    alone: list[list[int]] = []
    one_by_one = _worker(family, budget=1, calls=alone)
    _queue(one_by_one, items)
    while one_by_one.has_work():
        one_by_one.run_batch()
    cost = [c[0] for c in alone]
    assert len(alone) == len(items)  # a budget of one token: every item alone, none refused

    prepares = []
    real_prepare = worker_module.prepare_item
    monkeypatch.setattr(
        worker_module, "prepare_item", lambda *a: prepares.append(a[1].hash) or real_prepare(*a)
    )
    calls: list[list[int]] = []
    budget = cost[0] + cost[1]  # the image and the video fit; the next image does not
    batched = _worker(family, budget=budget, calls=calls)
    _queue(batched, items)
    batched.run_batch()
    assert calls == [cost[:2]]
    assert [i.hash for i in batched.queue] == ["b", "c"]  # the deferred item leads, prepared
    assert batched.queue[0].prepared is not None
    while batched.has_work():
        batched.run_batch()
    assert sum(calls, []) == cost and all(sum(c) <= budget or len(c) == 1 for c in calls)
    assert sorted(prepares) == ["a", "b", "c", "v"]  # each decoded and preprocessed once

    want, got = _features(one_by_one, "avbc"), _features(batched, "avbc")
    for h in "avbc":
        assert want[h] is not None and got[h] is not None
        torch.testing.assert_close(got[h], want[h], rtol=0, atol=1e-5)
    offered = [m.hash for m in batched.io.sent]
    assert offered == ["a", "v", "b", "c"]


def test_an_item_over_the_budget_runs_alone_and_repeats_are_encoded_once(family):
    calls: list[list[int]] = []
    worker = _worker(family, budget=2, calls=calls)  # under one 56 x 56 image's 4 tokens
    data = _png(56, 4)
    _queue(worker, [("x", data, "image"), ("x", data, "image"), ("y", _png(56, 5), "image")])
    while worker.has_work():
        worker.run_batch()
    assert calls == [[4], [4]]
    assert [m.hash for m in worker.io.sent] == ["x", "x", "y"]
