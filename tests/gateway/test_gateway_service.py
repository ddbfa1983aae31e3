"""/health, /v1/models, /metrics and the error shape of routes that do not exist."""

from __future__ import annotations

import re

import pytest
from gateway_helpers import chat_body, sse_events

pytestmark = pytest.mark.asyncio


async def test_health_is_ok_when_every_stage_is_live(client, fake) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "model": fake.model_name, "stages": fake.stages}


async def test_health_is_503_naming_the_stage_without_a_live_instance(client, fake) -> None:
    fake.healthy = False
    response = await client.get("/health")
    body = await response.json()
    assert response.status == 503 and body["status"] == "unavailable"
    assert body["message"] == "no live instance for stage(s): decode"


async def test_health_is_503_when_the_backend_check_itself_fails(client, fake) -> None:
    def broken() -> None:
        raise RuntimeError("registry lock poisoned")

    fake.health = broken
    response = await client.get("/health")
    assert response.status == 503 and "registry lock poisoned" in (await response.json())["message"]


async def test_models_lists_the_served_model(client, model_dir) -> None:
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [model_dir.name]
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == 4096
    assert (await client.get(f"/v1/models/{model_dir.name}")).status == 200
    missing = await client.get("/v1/models/other")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "model_not_found"


async def test_served_model_name_can_be_set(make_client) -> None:
    client = await make_client(served_model_name="qwen-tiny")
    assert (await (await client.get("/v1/models")).json())["data"][0]["id"] == "qwen-tiny"
    response = await client.post("/v1/chat/completions", json=chat_body(model="qwen-tiny", max_tokens=1))
    assert response.status == 200 and (await response.json())["model"] == "qwen-tiny"


def _sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} missing from /metrics"
    return float(match[1])


async def test_metrics_count_requests_tokens_and_latencies(client, fake) -> None:
    await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    await sse_events(await client.post("/v1/chat/completions", json=chat_body(max_tokens=3, stream=True)))
    await client.post("/v1/chat/completions", json=chat_body(temperature="x"))
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    text = await response.text()
    assert _sample(text, "epd_gateway_time_to_first_token_seconds_count") == 2
    assert _sample(text, "epd_gateway_time_per_output_token_seconds_count") == 2
    assert _sample(text, "epd_gateway_e2e_request_latency_seconds_count") == 2
    assert _sample(text, "epd_gateway_generation_tokens_total") == 8
    prompt = sum(len(r.token_ids) for r in fake.requests)
    assert _sample(text, "epd_gateway_prompt_tokens_total") == prompt
    assert _sample(text, "epd_gateway_requests_total", '{endpoint="chat",status="200"}') == 2
    assert _sample(text, "epd_gateway_requests_total", '{endpoint="chat",status="400"}') == 1
    assert _sample(text, "epd_gateway_running_requests") == 0
    assert text.endswith(fake.extra_metrics.decode()), "the backend's own metrics are appended"


async def test_unknown_routes_and_methods_get_openai_error_json(client) -> None:
    response = await client.get("/v1/nothing")
    assert (
        response.status == 404 and (await response.json())["error"]["message"] == "Not Found: GET /v1/nothing"
    )
    response = await client.get("/v1/chat/completions")
    assert response.status == 405 and "POST" in response.headers["Allow"]
    assert (await response.json())["error"]["code"] == 405
