"""Structured logging for every process: structlog on top of the standard library.

Lines carry the process name and, where a request is in play, its request id (bound with
`structlog.contextvars`), so one grep follows a request across gateway, encode, prefill and decode.
Standard-library loggers (`logging.getLogger("epd....")`) go through the same renderer, and so do
Python warnings. With EPD_LOG_JSON=1 every line is one JSON object with an ISO-8601 UTC timestamp, for
log shippers; stage processes also turn off the libraries' progress bars (transformers' "Loading
weights"), which would otherwise interleave non-JSON lines.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(
    process: str, level: str | None = None, json: bool | None = None, quiet_libraries: bool = False
) -> None:
    """Route every log line of this process through structlog. `quiet_libraries` (stage processes):
    no progress bars, transformers' own logging at warnings and above."""
    level = (level or os.environ.get("EPD_LOG_LEVEL", "INFO")).upper()
    json = json if json is not None else os.environ.get("EPD_LOG_JSON", "") == "1"
    if quiet_libraries:
        _quiet_libraries()
    stamp = (
        structlog.processors.TimeStamper(fmt="iso", utc=True)
        if json
        else structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
    )
    shared = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, stamp]
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
    logging.captureWarnings(True)  # warnings.warn(...) become log lines, not raw stderr text
    for noisy in ("httpx", "aiohttp.access", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _quiet_libraries() -> None:
    """Progress bars off before the libraries read their settings (at import), or right away if one
    was imported already; nothing here imports them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    loaded = sys.modules.get("transformers.utils.logging")
    if loaded is not None:
        loaded.disable_progress_bar()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
