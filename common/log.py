"""Structured logging for every process: structlog on top of the standard library.

Lines carry the process name and, where a request is in play, its request id (bound with
`structlog.contextvars`), so one grep follows a request across gateway, encode, prefill and decode.
Standard-library loggers (`logging.getLogger("epd....")`) go through the same renderer.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(process: str, level: str | None = None, json: bool | None = None) -> None:
    level = (level or os.environ.get("EPD_LOG_LEVEL", "INFO")).upper()
    json = json if json is not None else os.environ.get("EPD_LOG_JSON", "") == "1"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                lambda _, __, ev: {**ev, "process": process},
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "aiohttp.access", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
