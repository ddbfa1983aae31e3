"""Shared-memory specifics: who owns a segment, and that none outlives its consumer."""

from __future__ import annotations

import os

import pytest
from dataplane_harness import has_dev_shm, start_peers

from common.dataplane import Region, TransferState, create_dataplane
from common.dataplane.shm_segments import segment_name

pytestmark = pytest.mark.skipif(not has_dev_shm(), reason="needs /dev/shm to look at segments")


def segment_exists(plane_id: str, key: str) -> bool:
    return os.path.exists(f"/dev/shm/{segment_name(plane_id, key)}")


def test_segments_survive_producers_and_vanish_with_their_consumer():
    plane = create_dataplane("shm")
    plane.allocate("b", 4096)
    plane.allocate("c", 4096)
    assert segment_exists(plane.id, "b") and segment_exists(plane.id, "#abort-board")

    (peer,) = start_peers("shm", 1)
    handle = plane.expect("t", [Region("b", 0, 4096)])
    peer.call("write", peer=plane.descriptor(), tid="t", items=[["b", 0, 4096, 1]], wait=30)
    assert handle.wait(30) is TransferState.SUCCESS
    peer.close()
    assert segment_exists(plane.id, "b"), "a producer's exit must not unlink the consumer's memory"
    assert "leaked" not in peer.stderr(), peer.stderr()

    plane.free("b")
    assert not segment_exists(plane.id, "b")
    plane.close()
    assert not segment_exists(plane.id, "c") and not segment_exists(plane.id, "#abort-board")


def test_allocated_memory_can_be_kept_in_use_across_free():
    """free() unlinks at once even while the caller still holds views; the mapping goes with them."""
    import numpy as np

    plane = create_dataplane("shm")
    arr = np.frombuffer(plane.allocate("b", 64), dtype=np.uint8)
    plane.free("b")
    arr[:] = 1  # still mapped, so no crash
    assert not segment_exists(plane.id, "b")
    plane.close()
