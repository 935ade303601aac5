"""ASGI guards around every request: the API key, and a request body's size and arrival deadline.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so that streamed replies and client disconnects pass
through untouched (the synchronous routes watch for a disconnect to cancel their job)."""

from __future__ import annotations

import secrets
import time

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosmos3.server.errors import error_response, internal_error
from cosmos3.server.settings import Settings


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        settings = self.settings
        keys = sum(k.lower() == b"authorization" for k, _ in scope.get("headers", []))
        if settings.api_key and scope["path"] != "/health" and keys > 1:  # which one counts would depend on order
            await error_response(400, f"send one Authorization header, not {keys}")(scope, receive, send)
            return
        if settings.api_key and scope["path"] != "/health" and not _authorised(headers, settings.api_key):
            response = error_response(401, "Unauthorized: send 'Authorization: Bearer <key>' or 'Api-Key <key>'")
            await response(scope, receive, send)
            return
        limit = settings.limits.body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            response = error_response(413, f"the request body is larger than this server's {limit} bytes")
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(
                scope, _bounded(receive, limit, settings.body_timeout_s, settings.body_idle_timeout_s), tracked
            )
        except Exception as exc:
            # Answered here rather than by Starlette's outermost error middleware, which sends the same 500 but then
            # re-raises to the server: uvicorn then resets the connection, failing the client's next keep-alive
            # request. Once a response has started only closing the connection is left.
            if started:
                raise
            await internal_error(exc)(scope, receive, send)


def _authorised(headers: dict[str, str], key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() in ("bearer", "api-key") and secrets.compare_digest(token.strip().encode(), key.encode())


def _bounded(receive: Receive, limit: int, total_s: float, idle_s: float) -> Receive:
    """`receive` with a byte cap and deadlines for the body; after the body it passes straight through (a route
    waiting for a disconnect must be able to wait as long as it likes)."""
    deadline = time.monotonic() + total_s
    state = {"size": 0, "done": False}

    async def wrapped() -> Message:
        if state["done"]:
            return await receive()
        wait = min(idle_s, deadline - time.monotonic())
        message = None
        if wait > 0:
            with anyio.move_on_after(wait):
                message = await receive()
        if message is None:
            raise HTTPException(
                408, f"the request body did not arrive within {total_s:g} s (or paused over {idle_s:g} s)"
            )
        if message["type"] == "http.request":
            state["size"] += len(message.get("body", b""))
            if state["size"] > limit:
                raise HTTPException(413, f"the request body is larger than this server's {limit} bytes")
            state["done"] = not message.get("more_body", False)
        else:
            state["done"] = True
        return message

    return wrapped
