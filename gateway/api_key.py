"""The gateway's client check: a Bearer token on the OpenAI routes, as vLLM's `--api-key` does.

`/v1/...` and the operator routes `/admin/...` need the key; `/health` and `/metrics` stay open for orchestrators and scrapers (put
them behind the network's own controls). The comparison takes the same time whatever the guess.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def require_api_key(api_key: str) -> Callable:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(("/v1/", "/admin/")) or request.path == "/v1":
            sent = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(sent, expected):
                body = error_body(401, "missing or wrong API key: send `Authorization: Bearer <key>`")
                return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check
