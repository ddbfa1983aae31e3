"""Fixtures for the data-plane suite: a consumer plane here, producer peers in other processes.

Every backend runs the same tests. Peers (dataplane_harness.py) are started once per backend and module;
each test gets a fresh consumer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.dataplane import BACKENDS, DataPlane, create_dataplane

sys.path.insert(0, str(Path(__file__).parent))
from dataplane_harness import Peer, start_peers  # noqa: E402


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "mooncake":
        from common.dataplane.mooncake import unavailable_reason

        if (reason := unavailable_reason()) is not None:
            pytest.skip(reason)
    if request.param == "nixl":
        from common.dataplane.nixl import unavailable_reason as nixl_missing

        if (reason := nixl_missing()) is not None:
            pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def peers(backend: str) -> Iterator[list[Peer]]:
    """Two producer peers of the backend under test."""
    started = start_peers(backend, 2)
    yield started
    for peer in started:
        peer.close()


@pytest.fixture
def consumer(backend: str) -> Iterator[DataPlane]:
    plane = create_dataplane(backend)
    yield plane
    plane.close()
