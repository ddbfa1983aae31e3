"""Helpers shared by the gateway tests: request bodies, images, SSE parsing."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from aiohttp import ClientResponse
from PIL import Image


def png(width: int = 100, height: int = 60, colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat_body(content: Any = "Hello!", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


async def sse_events(response: ClientResponse) -> list[Any]:
    """The `data:` payloads of an SSE response, JSON-decoded, with "[DONE]" kept as a string."""
    events = []
    for block in (await response.text()).split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
