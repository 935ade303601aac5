"""The playground's way to the engine: the same one the HTTP routes take, without HTTP.

Generations are resolved by `cosmos3.server.submit.resolve` (the engine's and the operator's checks), their media
kept in the job's folder by `cosmos3.server.inputs`, queued on the server's `Worker` and waited for through
`Worker.when_done`; conversations are checked by the chat route's `check` and decoded in its thread pool under
`Worker.exclusive()`. Nothing here touches the engine directly except the Reasoner's stream, which runs only while
it holds the engine."""

from __future__ import annotations

import base64
import json
import mimetypes
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cosmos3.server import chat
from cosmos3.server.errors import APIError, QueueFull, ShuttingDown
from cosmos3.server.inputs import store_action_files, store_file, store_media
from cosmos3.server.jobs import FINAL, Job, new_id
from cosmos3.server.state import ServerState
from cosmos3.server.submit import resolve
from cosmos3.server.wire import extra_fields, random_seed

DIALECT = "python"  # the playground's fields are the Python API's (README "Requests")
JOB_KIND = "ui"  # the job store's dialect column for playground jobs


class UIError(Exception):
    """A problem to show the user (the handlers turn it into a `gr.Error`)."""


def message_of(exc: APIError) -> str:
    return f"{exc.param}: {exc.message}" if exc.param and exc.param not in exc.message else exc.message


def submit_generation(
    server: ServerState,
    fields: dict[str, Any],
    media: dict[str, str | None],
    info: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Job:
    """Keep the uploads (`media`: request field -> local file: image, video, action, action_stats) in a new job's
    folder, resolve the request with the "More fields" box's `extra` on top (typed action files are fetched by the
    routes' rules: URLs, data URIs, the operator's allowed folder), and queue it. A missing seed gets a
    random one, so that it can be shown and reused."""
    try:  # the routes' rules for fields sent by name: media only through the upload boxes
        typed, wire = extra_fields(extra or {}, DIALECT, "More fields: ", "give media with the upload boxes")
    except APIError as exc:
        raise UIError(message_of(exc)) from exc
    fields = {k: v for k, v in {**fields, **typed}.items() if v is not None}
    if fields.get("seed") is None:
        fields["seed"] = random_seed()
    job_id = new_id("ui")
    folder = server.worker.job_dir(job_id) / "inputs"
    try:
        store_action_files(fields, wire, folder, server.settings)  # typed strings: URLs, data URIs, allowed paths
        for name, path in media.items():
            if not path:
                continue
            data = Path(path).read_bytes()
            if name in ("image", "video"):
                stored, kind = store_media(data, folder, name, server.settings)
                fields[kind] = str(stored)
            else:  # an action JSON or statistics file
                try:
                    json.loads(data)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # Recursion: too deep
                    raise UIError(f"{name}: {Path(path).name} is not a JSON file") from exc
                fields[name] = str(store_file(data, folder, name, ".json"))
        if "image" in fields and "video" in fields:
            raise UIError("give an image or a video, not both")
        req = resolve(server, fields, DIALECT, wire)
        return server.worker.submit(JOB_KIND, req.__dict__, {**info, "mode": req.mode}, job_id)
    except APIError as exc:
        shutil.rmtree(server.worker.job_dir(job_id), ignore_errors=True)
        raise UIError(message_of(exc)) from exc
    except QueueFull as exc:
        shutil.rmtree(server.worker.job_dir(job_id), ignore_errors=True)
        raise UIError(f"the queue is full ({server.worker.max_queue} jobs); try again shortly") from exc
    except ShuttingDown as exc:
        shutil.rmtree(server.worker.job_dir(job_id), ignore_errors=True)
        raise UIError("the server is shutting down") from exc
    except BaseException:
        shutil.rmtree(server.worker.job_dir(job_id), ignore_errors=True)
        raise


def wait_for_job(server: ServerState, job_id: str, report: Callable[[Job], None], poll_s: float = 0.25) -> Job:
    """Block (in a worker thread, never on the event loop) until the job is final, calling `report(job)` with its
    stored state (status, progress) every `poll_s` seconds."""
    done = threading.Event()
    waiting = server.worker.when_done(job_id, done.set)
    try:
        while waiting and not done.wait(poll_s):
            job = server.store.get(job_id)
            if job is None or job.status in FINAL:
                break
            report(job)
    finally:
        if waiting:
            server.worker.forget(job_id, done.set)
    job = server.store.get(job_id)
    if job is None:
        raise UIError(f"job {job_id} was deleted")
    return job


def queue_position(server: ServerState, job_id: str) -> int:
    """How many queued jobs are ahead of this one (0 when it is next or running)."""
    queued = [j.id for j in server.store.list(status=("queued",))]
    return queued.index(job_id) if job_id in queued else 0


def data_uri(path: str | Path) -> tuple[str, str]:
    """An uploaded file as ("image" | "video", data: URI) for the Reasoner's messages (local paths are refused on
    a server without an allowed media folder; data URIs never are)."""
    mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    kind = "video" if mime.startswith("video/") else "image"
    return kind, f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def user_message(text: str, files: list[str]) -> dict[str, Any]:
    """One OpenAI user message: the uploads (as data URIs), then the text."""
    content: list[dict[str, Any]] = []
    for path in files:
        kind, uri = data_uri(path)
        content.append({"type": f"{kind}_url", f"{kind}_url": {"url": uri}})
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


async def stream_reply(
    server: ServerState, conversations: chat.Conversations, messages: list[dict], options: dict[str, Any]
) -> AsyncIterator[str]:
    """One conversation's reply, through the chat route's own path: checked by its `check` (limits, sampling),
    admitted and decoded by its `Conversations` (the continuously batched scheduler), the first choice's pieces
    yielded as they come. Closing the iterator (the user pressed stop or left) takes it out of the batch."""
    reasoning = bool(options.pop("reasoning", False))
    try:
        body = chat.ChatRequest(messages=messages, stream=True, **options)
        _, sampling, encode = chat.check(server, body)
    except APIError as exc:
        raise UIError(message_of(exc)) from exc
    except ValidationError as exc:
        raise UIError(str(exc)) from exc
    if reasoning:
        encode["reasoning"] = True
    try:
        first, pieces, stop = await conversations.stream(server.engine.reasoner, messages, sampling, encode)
    except APIError as exc:  # a full house
        raise UIError(exc.message) from exc
    try:
        kind, value = first
        while kind != "end":
            if kind == "error":
                raise UIError(f"{type(value).__name__}: {value}")
            if value.index == 0 and value.text:
                yield value.text
            kind, value = await pieces.get()
    finally:  # the user pressed stop or left: the conversation's rows leave the batch
        stop.set()
