"""Data planes with the stack's keys: members' transfers land; a producer without the key (or with
another stack's) is never connected, so its transfer never completes and (tcp) no byte of it lands."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.dataplane import Region, TransferState, create_dataplane
from common.stack_keys import StackKeys

SIZE = 64 * 1024


def _transfer(backend: str, consumer_keys, producer_keys, wait: float):
    with (
        create_dataplane(backend, keys=consumer_keys) as consumer,
        create_dataplane(backend, keys=producer_keys) as producer,
    ):
        buf = consumer.allocate("b", SIZE)
        arrival = consumer.expect("t", [Region("b", 0, SIZE)])
        sent = producer.write(
            consumer.descriptor(), "t", [(np.full(SIZE, 7, np.uint8), Region("b", 0, SIZE))]
        )
        state = arrival.wait(wait)
        landed = bytes(buf[:16])
        sent.abort()
        arrival.abort()
        return state, landed


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_members_transfer_over_curve(backend):
    keys = StackKeys.generate()
    state, landed = _transfer(backend, keys, keys, wait=20)
    assert state is TransferState.SUCCESS
    assert landed == bytes([7] * 16)


@pytest.mark.parametrize("backend", ["shm", "tcp"])
@pytest.mark.parametrize("producer", ["no keys", "another stack"])
def test_a_producer_without_the_stack_key_never_completes_a_transfer(backend, producer):
    keys = StackKeys.generate()
    start = time.monotonic()
    state, landed = _transfer(
        backend, keys, None if producer == "no keys" else StackKeys.generate(), wait=1.5
    )
    assert state is not TransferState.SUCCESS, f"a producer with {producer} completed a transfer"
    if backend == "tcp":  # the bytes travel on the refused connection itself
        assert landed == bytes(16), "bytes from a producer without the key landed"
    assert time.monotonic() - start < 10
