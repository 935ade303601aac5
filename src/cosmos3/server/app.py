"""`create_app`: one engine, the job store and worker, the guards, and the dialect routers. Wiring only.

Modules import downward: settings / limits / errors -> middleware / inputs / jobs -> state -> wire / submit ->
the dialects (images, videos, chat, hosted, discovery) -> app -> serve."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from cosmos3.server import chat, discovery, hosted, images, videos
from cosmos3.server.errors import ERRORS, install_error_handlers
from cosmos3.server.jobs import JobStore, Worker
from cosmos3.server.middleware import Guard
from cosmos3.server.settings import Settings
from cosmos3.server.state import ServerState

__all__ = ["Settings", "create_app"]


def create_app(engine: Any, settings: Settings | None = None) -> FastAPI:
    """The app for an already-loaded engine (tests pass the tiny one)."""
    settings = settings or Settings()
    store = JobStore(settings.jobs_db)
    worker = Worker(
        engine,
        store,
        settings.outputs_dir,
        settings.max_queue,
        settings.retention_s,
        settings.max_batch,
        scrub=settings.scrub,
    )
    server = ServerState(settings, engine, store, worker)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop, settings.shutdown_grace_s)

    app = FastAPI(
        title="cosmos3",
        version="0.1.0",
        lifespan=lifespan,
        description="Cosmos 3 Generator and Reasoner: OpenAI / vLLM-Omni routes and the hosted /predict.",
    )
    app.state.settings, app.state.server = settings, server
    app.state.engine, app.state.store, app.state.worker = engine, store, worker
    app.state.conversations = chat.Conversations(
        worker,
        settings.limits.max_pending_chats,
        settings.max_num_seqs,
        settings.max_num_batched_tokens,
        settings.limits.max_prompt_tokens,
    )
    if engine.reasoner is not None:  # chat media follow the same local-path rule as generation media
        engine.reasoner.allowed_media_dir = settings.allowed_local_media_path
        engine.reasoner.allow_local = settings.allowed_local_media_path is not None
        engine.reasoner.allow_private = settings.allow_private_urls
    install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)
    for router in (discovery.router, images.router, videos.router, chat.router, hosted.router):
        app.include_router(router, responses=ERRORS)
    return app
