"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, with the field named."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import OutOfMemoryError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.protocol import ErrorBody, ErrorResponse


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def redis_unavailable(what: str) -> ApiError:
    """503 for a request that needs Redis to decide (`what` cannot be checked) while Redis does not answer."""
    return ApiError(
        503,
        f"{what} cannot be checked (Redis unavailable); retry shortly",
        code="redis_unavailable",
        headers={"Retry-After": "5"},
    )


REDIS_FULL_RETRY_AFTER_S = "30"


def out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a write for want of memory (its maxmemory reached under `noeviction`): a command's
    `OOM` error, which redis-py raises as OutOfMemoryError without the code in its message (Redis 7 also answers so
    for a write in a script), or Redis 6.2's script error, whose message carries the command's."""
    return isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)


def redis_full(what: str) -> ApiError:
    """503 for a write Redis refused, full: nothing was stored, and nothing stored was evicted to make room."""
    return ApiError(
        503,
        f"{what} could not be stored: Redis is full (its maxmemory is reached, and it evicts nothing); retry later. "
        "Operators: see `rankloop feedback stats` (a stopped learner leaves the stream unconsumed) and raise "
        "RANKLOOP_REDIS_MAXMEMORY if memory allows",
        code="redis_full",
        headers={"Retry-After": REDIS_FULL_RETRY_AFTER_S},
    )


_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    409: "invalid_request_error",
    429: "requests",  # OpenAI's type for a request quota
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
}


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=error_type(status), param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    # FastAPI's first element says where the field was (body, query, path, header): the client knows its name.
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    parts = [str(p) for p in loc]
    # pydantic names the union branch that failed ("str", "list[TextPart]"); the user wants the field.
    return ".".join(p for p in parts if not p.startswith(("list[", "str", "function-")))


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """Errors the framework raises itself (a body that is not UTF-8 never reaches validation), in the same shape."""
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    if "parsing the body" in message:
        return error_response(400, "the body could not be parsed: send UTF-8 encoded JSON", None, "invalid_json")
    return error_response(exc.status_code, message, None, None, dict(exc.headers or {}) or None)


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


def _said(message: str) -> str:
    # pydantic prefixes the messages of our own validators with "Value error, ", which tells a client nothing.
    return message.removeprefix("Value error, ")


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0]
    param = _field(tuple(first["loc"])) or None
    if first["type"] == "json_invalid":
        message = f"the body is not valid JSON: {first['msg']}"
        if "surrogate" in message or "hex escape" in message:
            message += " (a lone surrogate: an escape of U+D800-U+DFFF must be one half of a surrogate pair)"
        return error_response(400, message, None, "invalid_json")
    if first["type"] == "extra_forbidden":
        return error_response(400, f"unknown field '{param}'", param, "unknown_field")
    if first["type"] == "missing" and param is None:
        return error_response(400, "the body must be a JSON object", None, "missing_body")
    message = "; ".join(f"{_field(tuple(e['loc'])) or 'body'}: {_said(e['msg'])}" for e in errors[:5])
    return error_response(400, message, param, "invalid_value")
