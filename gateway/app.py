"""The gateway's aiohttp application: the OpenAI endpoints, /health and /metrics over a `Backend`.

A request's life here: read the body (size-capped), then in a worker thread decode and check it, load
its images, render the chat template and expand the image placeholders (`Preprocessor`), then hand the
`GenerateRequest` to the backend and turn its token events into a response (`gateway.streaming`).
Nothing here imports torch or transformers: the gateway must start in well under a second.

    app = create_app(GatewayConfig(model_dir=...), backend, TextTokenizer.from_dir(model_dir))
    runner = await start_site(app, "0.0.0.0", 8000)   # ... await runner.cleanup() to stop
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from common.tokenizer import TextTokenizer
from gateway.accounting import Outcome, accounted
from gateway.admin_api import add_admin_routes
from gateway.api_key import require_api_key
from gateway.backend import Backend, GenerateRequest
from gateway.config import GatewayConfig
from gateway.connection_limits import ConnectionGuard, GuardedSite, track_requests
from gateway.errors import ApiError, error_body
from gateway.metrics import GatewayMetrics
from gateway.openai_api import ChatCompletionRequest, CompletionRequest, check_model, decode_body
from gateway.preprocess import Preprocessor
from gateway.responses import ChatFormat, CompletionFormat
from gateway.streaming import Generation, respond

log = structlog.get_logger("gateway")

CONFIG = web.AppKey("config", GatewayConfig)
BACKEND = web.AppKey("backend", Backend)
TOKENIZER = web.AppKey("tokenizer", TextTokenizer)
METRICS = web.AppKey("metrics", GatewayMetrics)
PREPROCESSOR = web.AppKey("preprocessor", Preprocessor)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
BACKGROUND = web.AppKey("background", set[asyncio.Task[None]])  # request releases (aborts) in flight
STARTED = web.AppKey("started", int)  # unix time, the `created` of /v1/models

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: GatewayConfig, backend: Backend, tokenizer: TextTokenizer) -> web.Application:
    middlewares = [track_requests, _errors_as_json]
    if config.api_key:
        middlewares.append(require_api_key(config.api_key))
    app = web.Application(client_max_size=config.max_request_bytes, middlewares=middlewares)
    app[CONFIG] = config
    app[BACKEND] = backend
    app[TOKENIZER] = tokenizer
    app[METRICS] = GatewayMetrics()
    app[METRICS].add_backend(backend)
    app[PREPROCESSOR] = Preprocessor(config, tokenizer)
    app[BACKGROUND] = set()
    app[STARTED] = int(time.time())
    app.cleanup_ctx.append(_worker_threads)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    add_admin_routes(app, backend, config.api_key)
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` on host:port (port 0: any free port, read it from `runner.addresses`).

    Handlers are cancelled when their client disconnects, so an abandoned request is aborted at once
    rather than at its next token. Connections are bounded (gateway.connection_limits): an idle one is
    closed after `keepalive_timeout_s`, one without a complete request head after `header_timeout_s`,
    and beyond `max_connections` new ones get a 503. Stop with `await runner.cleanup()`.
    """
    config = app[CONFIG]
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, keepalive_timeout=config.keepalive_timeout_s
    )
    await runner.setup()
    guard = ConnectionGuard(
        header_timeout_s=config.header_timeout_s,
        max_connections=config.max_connections,
        metrics=app[METRICS],
    )
    await GuardedSite(runner, host, port, guard).start()
    log.info(
        "gateway listening",
        addresses=[f"{a[0]}:{a[1]}" for a in runner.addresses],
        model=app[CONFIG].served_model_name,
    )
    return runner


async def _worker_threads(app: web.Application) -> AsyncIterator[None]:
    """The preprocessing threads live as long as the app; pending aborts get a moment at shutdown."""
    pool = ThreadPoolExecutor(max_workers=app[CONFIG].preprocess_threads, thread_name_prefix="gateway-pre")
    app[EXECUTOR] = pool
    yield
    if app[BACKGROUND]:
        await asyncio.wait(list(app[BACKGROUND]), timeout=5)
    pool.shutdown(wait=False, cancel_futures=True)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI's error JSON, aiohttp's own (404 route, 405 method) included."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(error_body(exc.status, message), status=exc.status, headers=allow)
    except Exception:
        log.exception("unhandled error", path=request.path)
        return web.json_response(error_body(500, "internal error in the gateway; see its log"), status=500)


# -- generation endpoints ------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    """Serve one generation request; `accounted` counts and logs it once, on every path."""
    request_id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    with (
        structlog.contextvars.bound_contextvars(request_id=request_id),
        accounted(request.app[METRICS], endpoint) as outcome,
    ):
        return await _serve(request, request_id, outcome)


async def _serve(request: web.Request, request_id: str, outcome: Outcome) -> web.StreamResponse:
    app = request.app
    headers = {"X-Request-Id": request_id}
    try:
        prepared, parsed = await _prepare(request, outcome.endpoint, request_id)
    except ApiError as exc:
        outcome.status, outcome.error = exc.status, exc.message
        return exc.response(headers=headers)
    app[METRICS].preprocess.observe(time.monotonic() - outcome.arrival)
    config = app[CONFIG]
    fmt_class = ChatFormat if outcome.endpoint == "chat" else CompletionFormat
    fmt = fmt_class(request_id, config.served_model_name, include_usage=parsed.include_usage)
    generation = outcome.generation = _generation(app, prepared, outcome.arrival)
    try:
        response, outcome.status = await respond(
            request, generation, fmt, stream=bool(parsed.stream), headers=headers
        )
    finally:  # started before any await: a cancelled wait below still leaves the release running
        await asyncio.shield(generation.release())
    return response


def _generation(app: web.Application, prepared: GenerateRequest, arrival: float) -> Generation:
    timeout = app[CONFIG].request_timeout_s
    return Generation(
        app[BACKEND],
        prepared,
        app[TOKENIZER],
        app[METRICS],
        arrival=arrival,
        deadline=None if timeout is None else arrival + timeout,
        background=app[BACKGROUND],
    )


async def _prepare(request: web.Request, endpoint: str, request_id: str) -> tuple[GenerateRequest, Any]:
    """Read the body on the loop, then decode, check and tokenize it in a worker thread."""
    app = request.app
    body = await _read_body(request, app[CONFIG])
    max_model_len = app[BACKEND].max_model_len
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        app[EXECUTOR], _prepare_sync, app, body, endpoint, request_id, max_model_len
    )


async def _read_body(request: web.Request, config: GatewayConfig) -> bytes:
    """The whole body, within `max_request_bytes` (413) and `body_timeout_s` from the head (408)."""
    try:
        return await asyncio.wait_for(request.read(), config.body_timeout_s)
    except web.HTTPRequestEntityTooLarge:
        limit = config.max_request_bytes
        raise ApiError(413, f"request body is larger than the limit of {limit} bytes") from None
    except asyncio.TimeoutError:
        limit_s = config.body_timeout_s
        raise ApiError(408, f"the request body did not arrive within {limit_s:g} s") from None


def _prepare_sync(
    app: web.Application, body: bytes, endpoint: str, request_id: str, max_model_len: int
) -> tuple[GenerateRequest, Any]:
    preprocessor = app[PREPROCESSOR]
    if endpoint == "chat":
        chat = decode_body(body, ChatCompletionRequest)
        check_model(chat.model, app[CONFIG].served_model_name)
        return preprocessor.chat(chat, request_id, max_model_len), chat
    completion = decode_body(body, CompletionRequest)
    check_model(completion.model, app[CONFIG].served_model_name)
    return preprocessor.completion(completion, request_id, max_model_len), completion


# -- models, health, metrics ------------------------------------------------------------------------------


def _model_card(app: web.Application) -> dict[str, Any]:
    return {
        "id": app[CONFIG].served_model_name,
        "object": "model",
        "created": app[STARTED],
        "owned_by": "epd-serve",
        "max_model_len": app[BACKEND].max_model_len,
    }


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app)]})


async def get_model(request: web.Request) -> web.Response:
    try:
        check_model(request.match_info["model"], request.app[CONFIG].served_model_name)
    except ApiError as exc:
        return exc.response()
    return web.json_response(_model_card(request.app))


async def health(request: web.Request) -> web.Response:
    """200 when every stage has a live instance; 503 naming the stages that have none."""
    backend = request.app[BACKEND]
    try:
        ok, stages = backend.health()
    except Exception as exc:
        log.exception("backend health check failed")
        return web.json_response(
            {"status": "unavailable", "message": f"health check failed: {exc}"}, status=503
        )
    body: dict[str, Any] = {
        "status": "ok" if ok else "unavailable",
        "model": backend.model_name,
        "stages": stages,
    }
    if not ok:
        empty = _empty_stages(stages)
        body["message"] = (
            f"no live instance for stage(s): {', '.join(empty)}"
            if empty
            else "the backend reports it is unhealthy"
        )
    return web.json_response(body, status=200 if ok else 503)


STAGE_NAMES = {"E": "encode", "P": "prefill", "D": "decode"}


def _empty_stages(detail: Any) -> list[str]:
    """Names of the stages counted as 0 anywhere in the backend's (possibly nested) health details."""
    found: list[str] = []
    for name, value in detail.items() if isinstance(detail, dict) else ():
        if isinstance(value, dict):
            found += _empty_stages(value)
        elif isinstance(value, int) and not isinstance(value, bool) and value == 0:
            found.append(STAGE_NAMES.get(name, str(name)))
    return found


async def metrics(request: web.Request) -> web.Response:
    """The gateway's metrics and the backend's (stage load, transfers, stage timings), one exposition."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
