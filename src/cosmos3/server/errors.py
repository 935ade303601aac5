"""The error envelope every route answers with: `{"error": {"message", "type", "param", "code"}}` (vLLM's)."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cosmos3.errors import RequestError

logger = logging.getLogger(__name__)

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # what a 405's Allow may list

TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


class APIError(Exception):
    """An HTTP error with the envelope; `param` names the request field as the client sent it."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


class QueueFull(Exception):
    """The generation queue has no room for the request (all of it: a request for n images takes n places)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


# Declared on every route so that the OpenAPI schema says what errors look like.
ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "Invalid field: the message names it, its value and what is allowed"),
        (401, "Missing or wrong API key"),
        (404, "Unknown job, or its output is gone"),
        (408, "The request body did not arrive in time"),
        (409, "The job is being cancelled"),
        (413, "Request or upload too large"),
        (422, "The job failed and has no content"),
        (429, "Queue full; see Retry-After"),
        (500, "Generation failed"),
        (503, "Shutting down"),
        (504, "Timed out"),
    )
}


def _safe(text: str | None) -> str | None:
    """Text that encodes as UTF-8 (a lone surrogate from the client is escaped rather than failing the reply)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {
        "error": {"message": _safe(message), "type": TYPES.get(status, "InternalServerError"), "param": _safe(param)}
    }
    body["error"]["code"] = status
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    def scrub(request: Request, message: str) -> str:
        return request.app.state.settings.scrub(message)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc.status, scrub(request, exc.message), exc.param, exc.headers)

    @app.exception_handler(RequestError)
    async def _request(request: Request, exc: RequestError):
        return error_response(400, scrub(request, str(exc)), exc.field)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, _: QueueFull):
        retry = request.app.state.settings.retry_after_s
        return error_response(429, "the generation queue is full; retry later", None, {"Retry-After": str(retry)})

    @app.exception_handler(ShuttingDown)
    async def _stopping(request: Request, _: ShuttingDown):
        return error_response(503, "the server is shutting down; retry on its restart", None, {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is ("body", <character offset>), not a field
            where = first.get("loc", ("body", "?"))[-1]
            reason = first.get("ctx", {}).get("error", "not JSON")
            return error_response(400, f"the request body is not valid JSON: {reason} at character {where}")
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        param = ".".join(loc) or None
        value = first.get("input")
        shown = repr(value)[:80] if value is not None else "missing"
        return error_response(400, f"{param or 'body'}={shown} is invalid: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            methods = allowed_methods(request.app, request.url.path)
            headers = {"Allow": ", ".join(methods)} if methods else None
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return internal_error(exc)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """A 405's Allow: the methods of the documented path template that `path` is, a literal one before one with
    parameters (POST /v1/videos/sync is not GET /v1/videos/{video_id}). Read from the OpenAPI schema, which FastAPI
    builds once: its routers nest routes in ways the routing API does not show."""
    matches = [
        (template, operations)
        for template, operations in app.openapi()["paths"].items()
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path)
    ]
    if not matches:
        return []
    _, operations = min(matches, key=lambda match: match[0].count("{"))
    return [m for m in HTTP_METHODS if m.lower() in operations]


def internal_error(exc: Exception) -> JSONResponse:
    """The 500 for an error no handler expected: logged with its traceback, its type named to the client."""
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}")
