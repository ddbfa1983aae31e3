"""Fixtures for the gateway's HTTP tests: the real app over a scripted fake backend.

The app, the tokenizer and the chat template are the real ones (from the tiny checkpoint); only the
stage services are replaced, by `FakeBackend`, so these tests isolate the HTTP layer.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from common.tokenizer import TextTokenizer
from gateway.app import create_app
from gateway.config import GatewayConfig

sys.path.insert(0, str(Path(__file__).parent))
from fake_backend import SENTENCE, FakeBackend  # noqa: E402

MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture(scope="session")
def model_dir(tiny_qwen2_vl: Path) -> Path:
    return tiny_qwen2_vl


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(model_dir)


@pytest.fixture
def fake(tokenizer: TextTokenizer) -> FakeBackend:
    return FakeBackend(text_ids=tokenizer.encode(SENTENCE), eos_id=tokenizer.eos_token_ids[0])


@pytest_asyncio.fixture
async def make_client(
    model_dir: Path, tokenizer: TextTokenizer, fake: FakeBackend
) -> AsyncIterator[MakeClient]:
    """`await make_client(**config_overrides)`: a test client of a fresh app over `fake`."""
    clients: list[TestClient] = []

    async def make(**overrides: Any) -> TestClient:
        config = GatewayConfig(model_dir=model_dir, **overrides)
        client = TestClient(TestServer(create_app(config, fake, tokenizer)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest_asyncio.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()
