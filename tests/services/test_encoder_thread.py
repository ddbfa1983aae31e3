"""The encoder call of a process that also prefills runs on a thread of its own, with its share of the
process's threads, and gives the same features as the call inline.

The thread count a call sees is read inside the call; the loop thread's own count must not move when
the encoder thread sets its own (OpenMP's count is per thread). The worker is driven by hand with a
real tiny Qwen2-VL vision tower.
"""

from __future__ import annotations

import threading

import pytest
import torch

from common.dataplane import create_dataplane
from common.protocol import Encode, FeatureOffer, MMItem
from services.encode.encoder_thread import EncoderThread
from services.encode.worker import EncodeWorker
from services.models.loader import load_model
from tests.services.test_encode_batching import _IO, _Frame, _png


class _Wakes:
    def __init__(self):
        self.count = 0
        self.event = threading.Event()

    def __call__(self):
        self.count += 1
        self.event.set()


def _seen_by_call(items):
    return [torch.tensor([threading.get_ident(), torch.get_num_threads()]) for _ in items]


@pytest.mark.parametrize("load, offloads", [(0, False), (2, False), (3, True), (40, True)])
def test_a_loaded_engine_sends_calls_to_the_thread_a_light_one_keeps_them_inline(load, offloads) -> None:
    thread = EncoderThread(_seen_by_call, 2, engine_load=lambda: load, wake=lambda: None, light_load=2)
    try:
        assert thread.offloads() == offloads
    finally:
        thread.close()


def test_a_call_runs_on_its_thread_with_one_thread_and_the_loop_keeps_its_count() -> None:
    before = torch.get_num_threads()
    wakes = _Wakes()
    thread = EncoderThread(_seen_by_call, 2, engine_load=lambda: 8, wake=wakes)
    try:
        assert not thread.running and thread.engine_threads() == 2
        thread.submit(["a", "b"])
        assert thread.running
        assert wakes.event.wait(30), "a finished call wakes the loop"
        assert thread.done() and thread.engine_threads() == 2, "a finished call leaves every thread"
        (ident, threads), _ = thread.result()
        assert int(ident) != threading.get_ident() and int(threads) == 1
        assert not thread.running and wakes.count == 1
        assert torch.get_num_threads() == before, "the loop thread keeps its own count"
    finally:
        thread.close()


def test_the_engine_gets_what_a_running_call_leaves() -> None:
    release = threading.Event()

    def slow(items):
        release.wait(30)
        return []

    thread = EncoderThread(slow, 2, engine_load=lambda: 8, wake=lambda: None)
    try:
        thread.submit([])
        assert thread.engine_threads() == 1 and not thread.done()
        with pytest.raises(RuntimeError, match="already running"):
            thread.submit([])
        release.set()
        thread.result()
        assert thread.engine_threads() == 2
    finally:
        release.set()
        thread.close()


def test_what_the_call_raises_comes_out_of_result() -> None:
    def broken(items):
        raise ValueError("bad pixels")

    thread = EncoderThread(broken, 1, engine_load=lambda: 0, wake=lambda: None)
    try:
        thread.submit([1])
        with pytest.raises(ValueError, match="bad pixels"):
            thread.result()
    finally:
        thread.close()


@pytest.fixture(scope="module")
def family(tiny_qwen2_vl):
    return load_model(tiny_qwen2_vl).family


def _offers(worker: EncodeWorker, images: list[bytes]) -> dict[str, torch.Tensor]:
    for i, data in enumerate(images):
        msg = Encode(
            request_id=f"r{i}", items=[MMItem(hash=f"h{i}", frame=0)], prefill_id="P", prefill_address="P"
        )
        worker.on_encode(msg, [_Frame(data)])
    worker.run_batch()
    thread = worker.encoder_thread
    if thread is not None:  # the call runs on its thread: the worker holds its requests meanwhile
        assert worker.request_ids() == {f"r{i}" for i in range(len(images))} and not worker.idle()
        while not thread.done():
            assert not worker.has_work(), "a call in flight is nothing for the loop to do"
            threading.Event().wait(0.005)
        assert worker.has_work()
        worker.run_batch()
        assert not worker.request_ids() and not thread.running
    sent = [m for m in worker.io.sent if isinstance(m, FeatureOffer)]
    assert [m.hash for m in sent] == [f"h{i}" for i in range(len(images))]
    return {h: worker._offers[(h, "P")] for h in (m.hash for m in sent)}


def test_features_from_the_encoder_thread_equal_the_inline_ones(family) -> None:
    images = [_png(56, 1), _png(84, 2), _png(112, 3)]
    inline = _offers(EncodeWorker(family, _IO(), create_dataplane("fake")), images)
    thread = EncoderThread(family.encode, 2, engine_load=lambda: 8, wake=lambda: None)
    try:
        threaded = _offers(
            EncodeWorker(family, _IO(), create_dataplane("fake"), encoder_thread=thread), images
        )
    finally:
        thread.close()
    for h, features in inline.items():
        assert torch.allclose(threaded[h], features, atol=1e-5, rtol=0), h
