"""Running the app under uvicorn with the guards a public server needs: a deadline for request headers (no
slowloris connection holds a slot forever), bounded header size, keep-alive and graceful-shutdown timeouts, and
SIGTERM that stops the running job at its next step rather than after it."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from cosmos3.server.app import create_app
from cosmos3.server.settings import Settings


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers: after the connection opens and after
    every response, a request must start within `timeout_s` (uvicorn's keep-alive timer stops at the first byte,
    so a client trickling header bytes would otherwise hold the connection forever)."""

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            cycle = self.cycle
            self.loop.call_later(timeout_s, self._expire, cycle)

        def _expire(self, cycle: Any) -> None:
            waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


class Server(uvicorn.Server):
    """A uvicorn server whose exit signal also tells the job worker to stop at the running job's next step."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.worker = app.state.worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.worker.begin_shutdown()
        super().handle_exit(sig, frame)


def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Server:
    settings: Settings = app.state.settings
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=header_deadline_protocol(settings.header_timeout_s),
        timeout_keep_alive=int(max(1, settings.keep_alive_s)),
        timeout_graceful_shutdown=int(max(1, settings.graceful_shutdown_s)),
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers
        log_level=log_level,
    )
    return Server(config, app)


def serve(engine: Any, settings: Settings, host: str, port: int) -> None:
    build_server(create_app(engine, settings), host, port).run()
