"""OpenAI-shaped errors: one exception for every refusal, one JSON shape for every failure.

Clients (the official `openai` library, benchmarks, curl users) read `error.message`, so each refusal
names the problem and, where one field is at fault, its `param`. `code` is OpenAI's string code where it
has one (`model_not_found`, `context_length_exceeded`) and the HTTP status otherwise, the same in a JSON
body and in an SSE error event.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


def error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str, *, param: str | None = None, code: str | int | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}` as OpenAI sends it."""
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code if code is not None else status,
        }
    }


class ApiError(Exception):
    """A request the gateway refuses or cannot serve; becomes an HTTP status with an error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)
