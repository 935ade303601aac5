"""What the routes share, kept on `app.state.server`: settings, engine, job store and worker, and the thread pools
that keep blocking work (media, the Reasoner) off the event loop."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from cosmos3.server.jobs import JobStore, Worker
from cosmos3.server.settings import Settings

T = TypeVar("T")


@dataclass
class ServerState:
    settings: Settings
    engine: Any
    store: JobStore
    worker: Worker
    # Media fetching, decoding and request resolution; its own pool so that slow URLs never starve other routes.
    inputs: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="cosmos3-inputs")
    )

    async def blocking(self, fn, *args: Any, **kwargs: Any):
        """Run blocking input work in the inputs pool and await it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.inputs, functools.partial(fn, *args, **kwargs))


def state(request: Request) -> ServerState:
    return request.app.state.server
