"""The HTTP app: one engine, the job worker, auth, the error envelope, and the dialect routers."""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cosmos3.errors import RequestError
from cosmos3.server.jobs import JobStore, QueueFull, Worker

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    model_name: str = "cosmos3"  # the id clients send as `model` and see in /v1/models
    api_key: str | None = None
    max_queue: int = 16
    allowed_local_media_path: Path | None = None  # local paths in requests must resolve under it; None: refused
    jobs_db: Path = Path("cosmos3-server/jobs.db")
    outputs_dir: Path = Path("cosmos3-server/outputs")
    retention_s: float = 24 * 3600.0
    max_upload_bytes: int = 512 * 2**20
    sync_timeout_s: float = 600.0
    retry_after_s: int = 30
    # Work limits per request (an operator's guard against requests that would hold the GPU for hours).
    max_steps: int = 200
    max_pixels: int = 1920 * 1088
    max_frames: int = 300
    max_tokens: int = 32768
    max_batch: int = 4  # queued text2image/text2video requests of one shape denoised together


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
        (404, "Unknown job"),
        (413, "Upload too large"),
        (422, "The job failed and has no content"),
        (429, "Queue full; see Retry-After"),
        (500, "Generation failed"),
        (504, "Timed out"),
    )
}


def check_limits(req, settings: Settings) -> None:
    """Raise a 400 naming the field when a resolved request exceeds the server's work limits."""
    if req.num_steps > settings.max_steps:
        raise APIError(
            400, f"num_steps={req.num_steps} exceeds this server's limit of {settings.max_steps}", "num_steps"
        )
    if req.num_frames is not None and req.num_frames > settings.max_frames:
        raise APIError(
            400, f"num_frames={req.num_frames} exceeds this server's limit of {settings.max_frames}", "num_frames"
        )
    if req.width and req.height and req.width * req.height > settings.max_pixels:
        raise APIError(
            400,
            f"size={req.width}x{req.height} exceeds this server's limit of {settings.max_pixels} pixels per frame",
            "size",
        )


class APIError(Exception):
    """An HTTP error with the OpenAI / vLLM envelope `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type_: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or {
            400: "BadRequestError",
            401: "AuthenticationError",
            403: "PermissionDeniedError",
            404: "NotFoundError",
            405: "MethodNotAllowedError",
            409: "ConflictError",
            413: "RequestTooLargeError",
            422: "UnprocessableEntityError",
            429: "RateLimitError",
            503: "ServiceUnavailableError",
            504: "TimeoutError",
        }.get(status, "InternalServerError")


def error_response(
    status: int, message: str, param: str | None = None, type_: str | None = None, headers: dict | None = None
) -> JSONResponse:
    err = APIError(status, message, param, type_)
    body = {"error": {"message": message, "type": err.type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(RequestError)
    async def _request(_: Request, exc: RequestError):
        return error_response(400, str(exc), exc.field)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, _: QueueFull):
        retry = request.app.state.settings.retry_after_s
        return error_response(429, "the generation queue is full; retry later", None, None, {"Retry-After": str(retry)})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        param = ".".join(loc) or None
        value = first.get("input")
        shown = repr(value)[:80] if value is not None else "missing"
        return error_response(400, f"{param or 'body'}={shown} is invalid: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # list every method of the path, not just the first route's
            methods = {
                m
                for r in request.app.routes
                if getattr(r, "path_regex", None) is not None and r.path_regex.match(request.url.path)
                for m in (getattr(r, "methods", None) or ())
            }
            headers = {"Allow": ", ".join(sorted(methods))}
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")


def create_app(engine: Any, settings: Settings | None = None) -> FastAPI:
    """The app for an already-loaded engine (tests pass the tiny one)."""
    from cosmos3.server import hosted, openai

    settings = settings or Settings()
    store = JobStore(settings.jobs_db)
    worker = Worker(engine, store, settings.outputs_dir, settings.max_queue, settings.retention_s, settings.max_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(
        title="cosmos3",
        version="0.1.0",
        lifespan=lifespan,
        description="Cosmos 3 Generator and Reasoner: OpenAI / vLLM-Omni routes and the hosted /predict.",
    )
    app.state.engine, app.state.settings, app.state.store, app.state.worker = engine, settings, store, worker
    if engine.reasoner is not None:  # chat media follow the same local-path rule as generation media
        engine.reasoner.allowed_media_dir = settings.allowed_local_media_path
        engine.reasoner.allow_local = settings.allowed_local_media_path is not None
    install_error_handlers(app)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if settings.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() not in ("bearer", "api-key") or not secrets.compare_digest(
                token.strip(), settings.api_key
            ):
                return error_response(401, "Unauthorized: send 'Authorization: Bearer <key>' or 'Api-Key <key>'")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "healthy"}

    app.include_router(openai.router, responses=ERRORS)
    app.include_router(hosted.router, responses=ERRORS)
    return app
