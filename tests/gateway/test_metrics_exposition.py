"""/metrics over the real cluster backend is one prometheus_client exposition: instance ids are escaped,
counters end in `_total`, and a failure reading the instances loses only their figures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from common.protocol import InstanceInfo, Load
from gateway.app import create_app
from gateway.cluster import Cluster
from gateway.config import GatewayConfig

pytestmark = pytest.mark.asyncio

AWKWARD_ID = 'decode "0" \\ on\nrack-2'  # a quote, a backslash and a newline


@pytest_asyncio.fixture
async def scrape(model_dir, tokenizer) -> AsyncIterator[Callable[[Cluster], Awaitable[list[Any]]]]:
    """`await scrape(cluster)`: the metric families of /metrics of an app over `cluster`."""
    clients: list[TestClient] = []

    async def get(cluster: Cluster) -> list[Any]:
        client = TestClient(TestServer(create_app(GatewayConfig(model_dir=model_dir), cluster, tokenizer)))
        await client.start_server()
        clients.append(client)
        response = await client.get("/metrics")
        assert response.status == 200
        return list(text_string_to_metric_families(await response.text()))

    yield get
    for client in clients:
        await client.close()


def cluster_with(instance_id: str, roles: str, load: Load) -> Cluster:
    cluster = Cluster("m", 4096)
    info = InstanceInfo(
        instance_id=instance_id,
        roles=roles,
        address="tcp://127.0.0.1:1",
        model="m",
        dataplane={"backend": "tcp"},
    )
    assert cluster.registry.admit(info) == (None, None)
    assert cluster.registry.heartbeat(instance_id, load)
    return cluster


def samples(families: list[Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in families for s in f.samples if s.name == name}


async def test_an_instance_id_with_quotes_backslashes_and_newlines_is_escaped(scrape) -> None:
    load = Load(waiting=3, encode_queue=2, free_kv_blocks=17, total_kv_blocks=64, transfer_bytes=4096)
    families = await scrape(cluster_with(AWKWARD_ID, "EPD", load))
    instance = (("instance", AWKWARD_ID),)
    assert samples(families, "epd_kv_free_blocks") == {instance: 17}
    assert samples(families, "epd_kv_total_blocks") == {instance: 64}
    assert samples(families, "epd_stage_queue_depth") == {
        (("instance", AWKWARD_ID), ("stage", stage)): depth for stage, depth in (("E", 2), ("P", 3), ("D", 3))
    }
    assert samples(families, "epd_transfer_bytes_total") == {(("backend", "tcp"), *instance): 4096}
    assert samples(families, "epd_stage_inflight_requests") == {instance: 0}
    names = {f.name for f in families}
    assert {"epd_gateway_requests", "epd_gateway_time_to_first_token_seconds"} <= names, "one exposition"


async def test_every_counter_ends_in_total(scrape) -> None:
    families = await scrape(cluster_with("pd0", "PD", Load(transfer_bytes=10, transfer_seconds=0.5)))
    counters = [f for f in families if f.type == "counter"]
    assert {"epd_transfer_bytes", "epd_transfer_seconds", "epd_gateway_requests"} <= {
        f.name for f in counters
    }
    for family in counters:
        for sample in family.samples:
            assert sample.name.endswith(("_total", "_created")), f"counter sample {sample.name}"


async def test_the_stage_timings_are_exposed_before_any_request(scrape) -> None:
    families = await scrape(cluster_with("pd0", "PD", Load()))
    histograms = {f.name for f in families if f.type == "histogram"}
    assert {
        "epd_stage_dispatch_to_first_token_seconds",
        "epd_stage_first_token_to_decode_seconds",
    } <= histograms


async def test_a_failure_reading_the_instances_loses_only_their_figures(scrape) -> None:
    cluster = cluster_with("pd0", "PD", Load(free_kv_blocks=5))
    cluster.registry.instances["pd0"].load = None  # type: ignore[assignment]  # a corrupt heartbeat
    families = await scrape(cluster)
    assert samples(families, "epd_kv_free_blocks") == {}
    assert samples(families, "epd_gateway_running_requests") == {(): 0}
