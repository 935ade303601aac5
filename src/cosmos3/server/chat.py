"""`POST /v1/chat/completions`: the Reasoner, OpenAI messages, `stream: true` as server-sent events.

OpenAI's fields: `n` choices, `stop`, `seed`, `logprobs` / `top_logprobs`, `frequency_penalty` / `presence_penalty`,
`max_completion_tokens`, `response_format` (json_object, json_schema: constrained decoding with llguidance),
`stream_options.include_usage`; vLLM's `top_k`, `repetition_penalty`, `media_io_kwargs`, `mm_processor_kwargs`.
Unset sampling fields take the documents' settings (with reasoning when the last user turn asks for <think>).
A field this server does not take (tools, logit_bias, ...) is a 400 naming it.

A conversation is read (media, the processor) in a thread of a pool, then decoded by the scheduler's own thread,
which takes the engine from the job worker for one short unit at a time (`Worker.exclusive`: each embedding,
admission and decode step); a running video lends it the engine between two transformer layers (`cosmos3.turns`),
so a chat does not wait for the video. After each step the scheduler's thread hands every conversation's new text
to the event loop in one call (`Streams`). The event loop only awaits it, so a conversation that waits for the
engine never holds up other routes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from cosmos3.errors import RequestError
from cosmos3.reasoning.decoding import MAX_N, MAX_TOP_LOGPROBS, STOP_ALLOWED, Sampling
from cosmos3.reasoning.messages import video_sampling
from cosmos3.reasoning.reasoner import Decode, Deltas, Reply, replies
from cosmos3.reasoning.scheduler import MAX_SLOTS, PREFILL_CHUNK, Scheduler
from cosmos3.server.errors import APIError
from cosmos3.server.jobs import Worker
from cosmos3.server.limits import Limits
from cosmos3.server.media_io import MediaIO, VideoIO
from cosmos3.server.state import ServerState, state
from cosmos3.server.submit import disconnected
from cosmos3.server.wire import Int, check_model, check_unicode, random_seed

router = APIRouter()


class ProcessorKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fps: float | None = None
    num_frames: Int | None = None
    do_sample_frames: bool | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = Field(None, description="wins over max_tokens")
    temperature: float | None = Field(None, description="unset: the documents' 0.7 (0.6 with reasoning)")
    top_p: float | None = Field(None, description="unset: 0.8 (0.95 with reasoning)")
    top_k: Int | None = Field(None, description="unset: 20; -1 or 0: off")
    repetition_penalty: float | None = Field(None, description="unset: 1.0")
    presence_penalty: float | None = Field(None, description="unset: 1.5 (0.0 with reasoning)")
    frequency_penalty: float | None = None
    seed: Int | None = Field(None, description="choice i uses seed + i; unset: random")
    stop: str | list[str] | None = Field(None, description=STOP_ALLOWED)
    n: Int = Field(1, description=f"choices, 1 to {MAX_N}, decoded together")
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(None, description=f"0 to {MAX_TOP_LOGPROBS}; needs logprobs")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema"}}'
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    media_io_kwargs: MediaIO | None = Field(
        None, description='how video frames are sampled: {"video": {"fps": 4}}; over the server\'s --media-io-kwargs'
    )
    mm_processor_kwargs: ProcessorKwargs | None = Field(None, description="fps / num_frames; wins over media_io_kwargs")
    user: str | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        # pydantic names a value that fits no member of a union by the member (`stop.str`); the client sent `stop`.
        # Its count and lengths are Sampling's to check (the Python API takes the same bounds).
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("stop", f"Input should be {STOP_ALLOWED}") from None


class Logprobs(BaseModel):
    content: list[dict[str, Any]]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str
    logprobs: Logprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Stream:
    """One conversation's reply on its way to the event loop: `pieces` (an asyncio queue) gets ("delta", Delta)
    items, then ("end", None) or ("error", exception). It is its rows' `Job.out`: the scheduler puts their items
    here during a step, and `Streams.flush` turns them into deltas after it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streams: Streams):
        self.loop, self.streams = loop, streams
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()  # the rows' `cancelled`: set, they leave the batch at the next step
        self.deltas: Deltas | None = None  # set before its rows are submitted
        self.failed = False  # a row failed: the other rows' items are dropped (on the scheduler's thread)
        self.ended = False  # its last item reached `pieces` (on the loop)

    def put(self, item: tuple[int, Any]) -> None:
        self.streams.post(self, item)

    def pieces_of(self, index: int, item: Any) -> list[tuple[str, Any]]:
        """The items of `pieces` one scheduler item makes (the delta logic is the Reasoner's `Deltas`)."""
        if self.failed:
            return []
        try:
            delta = self.deltas.of(index, item)
        except Exception as exc:  # a row failed: the reply ends with its error, the other rows leave the batch
            self.failed = True
            self.stop.set()
            return [("error", exc)]
        out = [("delta", delta)] if delta is not None else []
        return out + [("end", None)] if self.deltas.done else out


class Streams:
    """Every streaming conversation's way to the event loop. The scheduler's thread decodes all rows; after each
    step (`flush`, its `after_step`) it detokenizes the step's tokens and hands every stream's new pieces to the
    loop in one `call_soon_threadsafe`. Measured before this (benchmarks/README.md, "Serving"): a pool thread per
    stream waiting on its tokens, 64 streams meant 64 thread wake-ups and loop calls per step, all taking the GIL
    from the thread that drives the GPU."""

    def __init__(self, finished: Callable[[], None]):
        self.finished = finished  # on the loop, once per stream: its conversation gives its place back
        self.lock = threading.Lock()
        self.posted: list[tuple[Stream, tuple[int, Any]]] = []

    def post(self, stream: Stream, item: tuple[int, Any]) -> None:
        with self.lock:
            self.posted.append((stream, item))

    def flush(self) -> None:
        """On the scheduler's thread, after a step and outside the engine lock (detokenizing is host work that the
        GPU's next decode step, already launched, overlaps)."""
        with self.lock:
            posted, self.posted = self.posted, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, tuple[str, Any]]]] = {}
        for stream, item in posted:
            for piece in stream.pieces_of(*item):
                by_loop.setdefault(stream.loop, []).append((stream, piece))
        for loop, batch in by_loop.items():
            self.send(loop, batch)

    def send(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Stream, tuple[str, Any]]]) -> None:
        try:
            loop.call_soon_threadsafe(self.deliver, batch)
        except RuntimeError:  # the loop is gone (shutdown): the rows leave the batch
            for stream, _ in batch:
                stream.stop.set()

    def deliver(self, batch: list[tuple[Stream, tuple[str, Any]]]) -> None:
        """On the loop: each piece to its stream; a stream's first last piece ("end" or "error") finishes it."""
        for stream, piece in batch:
            if stream.ended:
                continue
            stream.pieces.put_nowait(piece)
            if piece[0] != "delta":
                stream.ended = True
                self.finished()


class Conversations:
    """The Reasoner's continuous-batching scheduler, and a thread pool that reads requests; at most `max_pending`
    conversations run or wait for the engine (more: 429). A conversation is read and tokenized in the pool (no
    GPU), which it then leaves; the scheduler embeds it (with the other prompts waiting for a row, in one
    vision-tower call), prefills it and decodes every running conversation in one batch, each step holding the
    engine, and its replies reach the event loop through `Streams`. Each step is one short unit of
    `Worker.exclusive`, which a running video lends between its layers."""

    def __init__(
        self,
        worker: Worker,
        max_pending: int,
        max_num_seqs: int = MAX_SLOTS,
        max_num_batched_tokens: int = PREFILL_CHUNK,
        max_prompt_tokens: int = Limits.max_prompt_tokens,
    ):
        self.worker, self.max_pending, self.pending = worker, max_pending, 0
        self.max_prompt_tokens = max_prompt_tokens  # bounds the prefill (and KV cache) one conversation causes
        self.max_num_seqs = max_num_seqs  # the scheduler's rows; a request's n choices take one each
        self.max_num_batched_tokens = max_num_batched_tokens  # the scheduler's prefill chunk
        # Threads for reading requests (URLs, video decoding, the processor): a conversation holds one only while it
        # is read, so many may arrive together without waiting for each other's decoding.
        self.pool = ThreadPoolExecutor(max_workers=max_pending, thread_name_prefix="cosmos3-chat")
        self.streams = Streams(self.release)
        self.scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    def admit(self) -> None:
        if self.pending >= self.max_pending:
            # A conversation lasts seconds: a client that retries after one finds a place as soon as one ends.
            message = f"{self.pending} conversations are running or waiting; retry later"
            raise APIError(429, message, None, {"Retry-After": "1"})
        self.pending += 1

    def check_length(self, decode: Decode, field: str) -> None:
        tokens = max(len(prompt.input_ids) for prompt in decode.prompts)
        if tokens > self.max_prompt_tokens:
            allowed = f"at most {self.max_prompt_tokens} prompt tokens on this server"
            raise RequestError(field, f"<a prompt of {tokens} tokens>", allowed, "is too long")

    def release(self) -> None:
        self.pending -= 1

    def scheduler_for(self, reasoner) -> Scheduler:
        with self._lock:
            if self.scheduler is None or self.scheduler.model is not reasoner.transformer:
                self.scheduler = Scheduler(
                    reasoner.transformer,
                    reasoner.eos_token_ids,
                    slots=self.max_num_seqs,
                    lock=self.worker.exclusive,
                    prefill_chunk=self.max_num_batched_tokens,
                    encode=reasoner.embed_many,
                    after_step=self.streams.flush,
                )
            return self.scheduler

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    async def complete(
        self, reasoner, messages: list[dict], sampling: Sampling, encode: dict, field: str = "messages"
    ) -> list[Reply]:
        """The whole reply: the stream's deltas added up (an input error raises, as the stream's first item)."""
        first, pieces, stop = await self.stream(reasoner, messages, sampling, encode, field=field)
        deltas = []
        try:
            kind, value = first
            while kind == "delta":
                deltas.append(value)
                kind, value = await pieces.get()
        finally:  # also when the request is cancelled while it waits: its rows leave the batch
            stop.set()
        if kind == "error":
            raise value
        return replies(deltas)

    async def stream(
        self,
        reasoner,
        messages: list[dict],
        sampling: Sampling,
        encode: dict,
        gone: Awaitable | None = None,
        field: str = "messages",
    ) -> tuple[tuple[str, Any] | None, asyncio.Queue, threading.Event]:
        """Read the conversation in the pool and submit its rows to the scheduler; returns (first item, queue of the
        rest, stop event). Items are ("delta", Delta), ("end", None) or ("error", exception). An input error is
        the first item, before any byte of the reply is sent, so that it can still be a 400. If `gone` (a
        client's disconnect) completes while the conversation waits for the engine, it ends (the first item is
        then None). Setting the stop event takes the rows out of the batch. A prompt of more than `max_prompt_tokens`
        tokens is an input error naming `field`. The HTTP routes and the playground all stream through here."""
        loop = asyncio.get_running_loop()
        stream = Stream(loop, self.streams)

        def read() -> None:
            try:
                # No GPU here (the scheduler embeds); a client gone before its prompt's turn frees its rows unused.
                decode = reasoner.prepare([messages], sampling, cancelled=stream.stop, **encode)
                self.check_length(decode, field)
                stream.deltas = Deltas(decode)
                reasoner.submit_scheduled(decode, self.scheduler_for(reasoner), stream)
            except Exception as exc:  # reported in the reply; the server keeps running
                stream.stop.set()
                self.streams.send(loop, [(stream, ("error", exc))])

        self.admit()
        try:
            loop.run_in_executor(self.pool, read)
        except BaseException:
            self.release()
            raise
        first = asyncio.ensure_future(stream.pieces.get())
        left = asyncio.ensure_future(gone) if gone is not None else None
        try:
            await asyncio.wait({first} | ({left} if left else set()), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request itself was cancelled: its rows leave the batch
            stream.stop.set()
            raise
        if left is not None:
            left.cancel()
        if not first.done():
            first.cancel()
            stream.stop.set()
            return None, stream.pieces, stream.stop
        return first.result(), stream.pieces, stream.stop


async def unless_gone(request: Request, reply: Awaitable[Any]) -> Any:
    """`reply`'s result, or 499 once the client has gone: its rows then leave the batch (the cancelled `complete`
    sets their stop), so a long prompt whose client left stops at its next prefill chunk. Starlette cancels nothing
    of a non-streamed route when its client leaves."""
    task, gone = asyncio.ensure_future(reply), asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise APIError(499, "the client closed the request")
    return task.result()


def sampling_of(body: ChatRequest, default: MediaIO | None = None) -> tuple[Sampling, dict[str, Any]]:
    """The request's Sampling, fields left unset staying None for the Reasoner to give the documents' settings, and
    its encode keyword arguments over the server's `default` media_io_kwargs."""
    sampling = Sampling(
        max_tokens=next(
            (v for v in (body.max_completion_tokens, body.max_tokens) if v is not None), Sampling.max_tokens
        ),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=0 if body.top_k == -1 else body.top_k,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed if body.seed is not None else random_seed(),
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        n=body.n,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        response_format=body.response_format,
    )
    video = body.media_io_kwargs.video if body.media_io_kwargs else None
    return sampling, video_encode(default, video, body.mm_processor_kwargs)


def video_encode(
    default: MediaIO | None, video: VideoIO | None, processor: ProcessorKwargs | None = None
) -> dict[str, Any]:
    """The Reasoner's frame-sampling keyword arguments (`video_fps`, `video_num_frames`) of a request: the server's
    `--media-io-kwargs` default, then the request's `media_io_kwargs.video` over it field by field (as vLLM merges
    them), then its `mm_processor_kwargs` over both. The chat route, the playground and `/predict` all come here, so
    the default is applied one way. The Reasoner checks the result (`messages.video_sampling`, the media limits)."""
    server = default.video.model_dump(exclude_none=True) if default is not None and default.video is not None else {}
    asked: dict[str, Any] = {}
    for source in (video, processor):
        if source is not None:
            asked.update(source.model_dump(include={"fps", "num_frames"}, exclude_none=True))
    # fps and a frame count are two ways of choosing frames (vLLM keeps the fewer; here one is allowed): a request
    # that picks one drops the server's pick, so that a default num_frames does not make a request's fps a 400.
    if asked.get("fps") is not None or asked.get("num_frames", -1) != -1:
        server = {k: v for k, v in server.items() if k not in ("fps", "num_frames")}
    merged = {**server, **asked}
    encode: dict[str, Any] = {}
    if merged.get("fps") is not None:
        encode["video_fps"] = merged["fps"]
    if merged.get("num_frames", -1) != -1:  # -1: every frame is read and the processor samples them (its fps)
        encode["video_num_frames"] = merged["num_frames"]
    return encode


def media_io_default(text: str, flag: str = "--media-io-kwargs") -> MediaIO:
    """`cosmos3 serve --media-io-kwargs JSON`, read with the model a request's `media_io_kwargs` is read with and
    checked as a request's would be, so that a bad default stops the server at startup, not every video chat."""
    allowed = '{"video": {"fps": F}} or {"video": {"num_frames": N}} as JSON (num_frames -1: every frame)'
    try:
        default = MediaIO.model_validate_json(text)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise RequestError(
            flag, text, allowed, f"is not allowed ({where + ': ' if where else ''}{problem['msg']})"
        ) from exc
    encode = video_encode(default, None)
    try:
        video_sampling(encode.get("video_fps"), encode.get("video_num_frames"))
    except RequestError as exc:
        allowed = exc.allowed + (", or -1: every frame" if exc.field.endswith("num_frames") else "")
        raise RequestError(
            flag, text, allowed, f"is not allowed ({exc.field.removeprefix('media_io_kwargs.')})"
        ) from exc
    return default


def text_chars(messages: list[dict]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def check(server: ServerState, body: ChatRequest) -> tuple[Any, Sampling, dict[str, Any]]:
    settings, engine = server.settings, server.engine
    check_model(body.model, settings)
    if engine.reasoner is None:
        raise APIError(400, "this server was started without the Reasoner", "model")
    check_unicode(body.messages, "messages")
    chars = text_chars(body.messages)
    if chars > settings.limits.max_chat_chars:
        raise APIError(
            400, f"messages hold {chars} characters; this server accepts {settings.limits.max_chat_chars}", "messages"
        )
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    sampling, encode = sampling_of(body, settings.media_io_kwargs)
    try:
        replace(sampling).check()  # the unset fields stay unset: the Reasoner resolves them per conversation
        settings.limits.check_tokens(sampling.max_tokens)
        engine.reasoner.grammar(sampling.response_format)
    except RequestError as exc:
        field = exc.field
        if field == "max_tokens" and body.max_completion_tokens is not None:
            field = "max_completion_tokens"
        raise APIError(400, str(exc).replace("max_tokens", field, 1), field) from exc
    return engine.reasoner, sampling, encode


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "chat.completion.chunk events with stream"}},
)
async def chat_completions(body: ChatRequest, request: Request):
    server = state(request)
    conversations: Conversations = request.app.state.conversations
    reasoner, sampling, encode = check(server, body)
    created, completion_id, model = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}", server.settings.model_name
    if not body.stream:
        replies = await unless_gone(request, conversations.complete(reasoner, body.messages, sampling, encode))
        completion_tokens = sum(r.completion_tokens for r in replies)
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatMessage(content=r.text),
                    finish_reason=r.finish_reason,
                    logprobs=Logprobs(content=r.logprobs) if r.logprobs is not None else None,
                )
                for i, r in enumerate(replies)
            ],
            usage=Usage(
                prompt_tokens=replies[0].prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=replies[0].prompt_tokens + completion_tokens,
            ),
        )

    first, pieces, stop = await conversations.stream(
        reasoner, body.messages, sampling, encode, gone=disconnected(request)
    )
    if first is None:
        raise APIError(499, "the client closed the request")
    if first[0] == "error":
        stop.set()
        raise first[1]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def choice(delta: Any) -> dict:
        out = {"index": delta.index, "delta": {"content": delta.text}, "finish_reason": delta.finish_reason}
        if sampling.logprobs:
            out["logprobs"] = {"content": delta.logprobs or []}
        return out

    counts = {"prompt": 0, "completion": 0}

    def event(kind: str, value: Any) -> tuple[str, bool]:
        """The server-sent events of one item, and whether it is the reply's last."""
        if kind == "delta":
            if value.finish_reason is not None:
                counts["prompt"] = value.prompt_tokens
                counts["completion"] += value.completion_tokens
            return (chunk([choice(value)]) if value.text or value.finish_reason is not None else ""), False
        if kind == "end":
            if not include_usage:
                return "", True
            prompt, completion = counts["prompt"], counts["completion"]
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
            return chunk([], usage.model_dump()), True
        error_type = "BadRequestError" if isinstance(value, RequestError) else "InternalServerError"
        return f"data: {json.dumps({'error': {'message': str(value), 'type': error_type}})}\n\n", True

    async def events():
        try:
            yield chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    for i in range(sampling.n)
                ]
            )
            text, last = event(*first)
            while True:
                # With the items already queued in one write: a loop that fell behind the decode steps catches up
                # in fewer, larger sends.
                while not last and not pieces.empty():
                    more, last = event(*pieces.get_nowait())
                    text += more
                if text:
                    yield text
                if last:
                    break
                text, last = event(*await pieces.get())
            yield "data: [DONE]\n\n"
        finally:
            stop.set()

    return StreamingResponse(events(), media_type="text/event-stream")
