"""What every generation route does after parsing its wire format: resolve the request once (the dialect's
defaults, then the operator's limits), queue it, wait for it without blocking the event loop (a client that goes
away cancels its job), and read its output."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import Request

from cosmos3.errors import RequestError
from cosmos3.generation.request import GenerateRequest
from cosmos3.server.errors import APIError
from cosmos3.server.jobs import Job
from cosmos3.server.state import ServerState

logger = logging.getLogger(__name__)


def resolve(server: ServerState, fields: dict[str, Any], dialect: str, wire: dict[str, str]) -> GenerateRequest:
    """`GenerateRequest.from_dict(fields, dialect)` resolved by the engine, then checked against the operator's
    limits. A RequestError becomes a 400 whose `param` is the field as the client named it (`wire`: request field
    -> wire name)."""
    if server.engine.generator is None:
        raise APIError(400, "this server was started without the Generator (reasoning only)", "model")
    try:
        req = server.engine.request(GenerateRequest.from_dict(fields, dialect))
        server.settings.limits.check_request(req)
    except RequestError as exc:
        raise APIError(400, server.settings.scrub(str(exc)), wire.get(exc.field, exc.field)) from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a value of a type no check expected
        logger.warning("request fields the request model did not check: %r", exc)
        raise APIError(400, f"a request field has a value of the wrong type ({type(exc).__name__}: {exc})") from exc
    return req


def failure(job: Job) -> APIError:
    error = job.error or {}
    if job.status == "cancelled":
        return APIError(409, f"job {job.id} was cancelled", "video_id")
    param = error.get("param")
    return APIError(error.get("code", 500), error.get("message", "generation failed"), wire_name(job, param))


def wire_name(job: Job, field: str | None) -> str | None:
    """A request field as the job's client named it (routes keep their names in the job's info)."""
    return job.info.get("wire", {}).get(field, field) if field else field


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_for_jobs(request: Request, server: ServerState, jobs: list[Job]) -> list[Job]:
    """Wait for the jobs of a synchronous route: a client that disconnects cancels them, a timeout cancels them
    (504), and a failure becomes its error response. Nothing here blocks the event loop."""
    loop = asyncio.get_running_loop()
    worker, timeout = server.worker, server.settings.sync_timeout_s
    futures = {job.id: loop.create_future() for job in jobs}

    def callback(future: asyncio.Future):
        def done() -> None:  # on the worker's thread
            try:
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
            except RuntimeError:  # the loop is closed (shutdown)
                pass

        return done

    callbacks = {job_id: callback(future) for job_id, future in futures.items()}
    registered = await server.blocking(lambda: [i for i, cb in callbacks.items() if worker.when_done(i, cb)])
    if registered:
        gone = asyncio.ensure_future(disconnected(request))
        everything = asyncio.ensure_future(asyncio.gather(*(futures[i] for i in registered)))
        try:
            finished, _ = await asyncio.wait({everything, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is stopping (or the client went away mid-await)
            if not worker.stopping:
                server.inputs.submit(_cancel_all, worker, jobs)
            raise
        finally:
            gone.cancel()
            everything.cancel()
            server.inputs.submit(lambda: [worker.forget(i, callbacks[i]) for i in registered])
        if everything not in finished:
            await server.blocking(_cancel_all, worker, jobs)
            if gone in finished:
                raise APIError(499, "the client closed the request; its job was cancelled")
            raise APIError(504, f"generation did not finish within {timeout:.0f} s; the job was cancelled")
    done_jobs = await server.blocking(lambda: [server.store.get(job.id) for job in jobs])
    for job, final in zip(jobs, done_jobs, strict=True):
        if final is None:
            raise APIError(404, f"job {job.id} was deleted", "video_id")
        if final.status != "completed":
            raise failure(final)
    return done_jobs


def _cancel_all(worker, jobs: list[Job]) -> None:
    for job in jobs:
        worker.cancel(job.id)


def read_output(job: Job, index: int = 0) -> bytes:
    """A finished job's file; a file that is gone (removed by hand or by retention) is a 404, not a 500."""
    try:
        with open(job.outputs[index], "rb") as f:
            return f.read()
    except (OSError, IndexError) as exc:
        raise APIError(404, f"the output of job {job.id} is no longer available", "video_id") from exc


def open_output(job: Job, index: int = 0) -> tuple[Iterator[bytes], int]:
    """A finished job's file as chunks and its size; opened before the reply starts, so that a removed file is a
    404 and a file removed while it streams still streams whole."""
    try:
        f = open(job.outputs[index], "rb")  # noqa: SIM115 (closed by the iterator)
    except (OSError, IndexError) as exc:
        raise APIError(404, f"the output of job {job.id} is no longer available", "video_id") from exc
    size = f.seek(0, 2)
    f.seek(0)

    def chunks() -> Iterator[bytes]:
        with f:
            while chunk := f.read(1 << 20):
                yield chunk

    return chunks(), size
