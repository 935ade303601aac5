"""The hosted dialect: `POST /predict` with `model_mode`, Framework field names, base64 media in the reply.

`model_mode: "reasoner"` asks the Reasoner instead (`cosmos3.reason_request.ReasonRequest`, the spec files' reasoner
entry): a prompt, an optional image or video `vision_path`, the Framework's decoding fields; the reply is the text
(`text`, and `sample_outputs.outputs[0].content.reasoner_text` as the Framework's SampleOutputs put it). It is
decoded through the chat route's `Conversations` (its pool, continuous batching and bound on waiting
conversations), so it never blocks the event loop and shares the engine with generation jobs as chats do."""

from __future__ import annotations

import base64
import shutil
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from cosmos3.errors import RequestError
from cosmos3.generation.dialects import ACTION_MODES, REASONER_MODE
from cosmos3.media import probe_media
from cosmos3.reason_request import SAMPLING_FIELDS, ReasonRequest, media_error
from cosmos3.server.chat import VideoIO, unless_gone, video_encode
from cosmos3.server.errors import APIError
from cosmos3.server.inputs import fetch, store_file, store_media
from cosmos3.server.jobs import Job, new_id
from cosmos3.server.settings import Settings
from cosmos3.server.state import ServerState, state
from cosmos3.server.submit import read_output, resolve, wait_for_jobs
from cosmos3.server.wire import Int, Text, load_json

router = APIRouter()

Mode = Literal[
    "text2image",
    "text2video",
    "image2video",
    "video2video",
    "forward_dynamics",
    "inverse_dynamics",
    "policy",
    "wam",
    "reasoner",
]
# The body fields only model_mode "reasoner" takes (a Generator request that sends one is a 400 naming it).
# (`seed` is every mode's; `max_new_tokens` is the Framework's name of max_tokens.)
REASONER_FIELDS = (*(f for f in SAMPLING_FIELDS if f != "seed"), "max_new_tokens")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_mode: Mode = "text2video"
    prompt: Text = ""
    negative_prompt: Text | None = None
    name: str | None = Field(None, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    resolution: str | Int | None = None
    aspect_ratio: str | None = None
    num_frames: Int | None = None
    fps: float | None = None
    seed: Int | None = None
    vision_path: str | None = Field(None, description="an http(s) URL, a data URI or an allow-listed local path")
    action_path: str | None = Field(None, description="a JSON action file: URL, data URI or allow-listed path")
    image_size: Int | str | None = None
    num_steps: Int | None = None
    guidance: float | None = None
    shift: float | None = None
    action_chunk_size: Int | None = None
    raw_action_dim: Int | None = None
    domain_name: str | None = None
    view_point: str | None = None
    enable_sound: bool | None = None
    use_system_prompt: bool | None = None
    # model_mode "reasoner" only; unset: the Framework's greedy decoding of up to 1024 tokens.
    max_tokens: Int | None = None
    max_new_tokens: Int | None = Field(None, description="the Framework's name of max_tokens")
    do_sample: bool | None = Field(None, description="unset: true when temperature, top_p or top_k is sent")
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    video_fps: float | None = Field(
        None, description="video frames the Reasoner samples per second (unset: --media-io-kwargs, else 2)"
    )


class SampleOutput(BaseModel):
    content: dict[str, Any]
    files: list[str]


class SampleOutputs(BaseModel):
    status: str
    outputs: list[SampleOutput]


class PredictResponse(BaseModel):
    name: str
    model_mode: str
    format: str | None = None  # jpg or mp4 (Generator modes)
    data: str | None = None  # base64 of the JPEG or MP4 (Generator modes)
    text: str | None = None  # the Reasoner's reply (model_mode reasoner)
    seed: int
    sample_outputs: SampleOutputs | None = None


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
async def predict(body: PredictRequest, request: Request):
    """One synchronous call for all six Generator modes and the Reasoner; closing the connection cancels a
    Generator job."""
    server = state(request)
    if body.model_mode == REASONER_MODE:
        return await predict_reasoner(body, request, server)
    sent = [name for name in REASONER_FIELDS if name in body.model_fields_set]
    if sent:
        raise APIError(400, f"{sent[0]} is a Reasoner field; model_mode {body.model_mode} does not take it", sent[0])
    job = await server.blocking(queue_predict, server, body)
    (done,) = await wait_for_jobs(request, server, [job])
    data = await run_in_threadpool(read_output, done)
    reply = PredictResponse(
        name=done.info["name"],
        model_mode=body.model_mode,
        format="jpg" if done.outputs[0].endswith(".jpg") else "mp4",
        data=base64.b64encode(data).decode(),
        seed=done.request["seed"],
    )
    if "action" in done.result:
        files = [p.rsplit("/", 1)[-1] for p in done.outputs]
        output = SampleOutput(content={"action": done.result["action"]}, files=files)
        reply.sample_outputs = SampleOutputs(status="success", outputs=[output])
    return reply


def queue_predict(server: ServerState, body: PredictRequest) -> Job:
    mode = "policy" if body.model_mode == "wam" else body.model_mode
    action = mode in ACTION_MODES
    fields: dict[str, Any] = {"mode": mode}
    for name in (
        "prompt",
        "negative_prompt",
        "num_frames",
        "fps",
        "seed",
        "aspect_ratio",
        "num_steps",
        "guidance",
        "shift",
        "action_chunk_size",
        "raw_action_dim",
        "domain_name",
        "view_point",
        "enable_sound",
        "use_system_prompt",
    ):
        if getattr(body, name) is not None:
            fields[name] = getattr(body, name)
    wire = {"width": "resolution", "height": "resolution", "size": "resolution"}
    # The canvas tier: `image_size` in the action examples, `resolution` in the others; either name in any mode (the
    # Framework's alias table), never one of two disagreeing values silently.
    tiers = {k: str(v) for k, v in (("resolution", body.resolution), ("image_size", body.image_size)) if v is not None}
    if len(set(tiers.values())) > 1:
        raise APIError(
            400, f"image_size={body.image_size!r} disagrees with resolution={body.resolution!r}; send one", "image_size"
        )
    for name, tier in tiers.items():
        fields["resolution"], wire["resolution"] = tier, name
    job_id = new_id("predict")
    folder = server.worker.job_dir(job_id) / "inputs"
    try:
        if body.vision_path:
            path, kind = store_media(
                fetch(body.vision_path, "vision_path", server.settings), folder, "vision_path", server.settings
            )
            if mode == "text2video":  # the Framework infers the mode from vision_path when none is sent
                fields["mode"] = mode = "image2video" if kind == "image" else "video2video"
            if (mode, kind) in (("image2video", "video"), ("video2video", "image"), ("inverse_dynamics", "image")):
                raise APIError(
                    400,
                    f"vision_path holds {'an' if kind == 'image' else 'a'} {kind}; {mode} needs the other",
                    "vision_path",
                )
            fields[kind] = str(path)
            wire[kind] = "vision_path"
        if body.action_path:
            data = fetch(body.action_path, "action_path", server.settings)
            load_json(data, "action_path", "a JSON file")
            fields["action"] = str(store_file(data, folder, "action_path", ".json"))
            wire["action"] = "action_path"
        if mode in ("image2video", "video2video") or (action and "image" not in fields and "video" not in fields):
            wire.setdefault("image", "vision_path")
            wire.setdefault("video", "vision_path")
        req = resolve(server, fields, "hosted", wire)
        name = body.name or f"sample_{uuid.uuid4().hex[:8]}"
        info = {"prompt": body.prompt, "mode": mode, "name": name, "wire": {k: v for k, v in wire.items() if k != v}}
        return server.worker.submit("predict", req.__dict__, info, job_id)
    except BaseException:
        shutil.rmtree(server.worker.job_dir(job_id), ignore_errors=True)
        raise


async def predict_reasoner(body: PredictRequest, request: Request, server: ServerState) -> PredictResponse:
    """The Reasoner's reply to one /predict body. `vision_path` is read as the Generator modes read it (a URL,
    data URI or allow-listed path, within the operator's upload and input limits, in the inputs pool) and handed
    on as a data URI of the same bytes, so the Reasoner decodes what the client sent, within the chat route's media
    limits (`cosmos3.reasoning.messages`)."""
    engine, settings = server.engine, server.settings
    if engine.reasoner is None:
        raise APIError(400, "this server was started without the Reasoner", "model_mode")
    fields: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set if name != "vision_path"}
    if body.vision_path:
        fields.update(await server.blocking(_vision_part, body.vision_path, settings))
    try:
        req = ReasonRequest.from_dict(fields, "hosted").resolved()
        settings.limits.check_tokens(req.max_tokens)
    except RequestError as exc:  # named as the client sent it (the Framework's max_new_tokens, say)
        field = "max_new_tokens" if exc.field == "max_tokens" and "max_new_tokens" in fields else exc.field
        raise APIError(400, settings.scrub(str(exc).replace(exc.field, field, 1)), field) from exc
    if len(req.prompt) > settings.limits.max_chat_chars:
        raise APIError(
            400,
            f"prompt holds {len(req.prompt)} characters; this server accepts {settings.limits.max_chat_chars}",
            "prompt",
        )
    conversations = request.app.state.conversations
    sampling, encode = req.sampling()
    # The spec files' video_fps is this dialect's media_io_kwargs.video.fps: over the server's default the same way.
    video = VideoIO(fps=encode.pop("video_fps", None))
    encode.update(video_encode(settings.media_io_kwargs, video))
    try:
        (reply,) = await unless_gone(
            request, conversations.complete(engine.reasoner, req.messages(), sampling, encode, field="prompt")
        )
    except RequestError as exc:
        raise media_error(exc) from exc
    output = SampleOutput(content={"reasoner_text": reply.text}, files=[])
    return PredictResponse(
        name=body.name or f"sample_{uuid.uuid4().hex[:8]}",
        model_mode=REASONER_MODE,
        text=reply.text,
        seed=req.seed,
        sample_outputs=SampleOutputs(status="success", outputs=[output]),
    )


def _vision_part(vision_path: str, settings: Settings) -> dict[str, str]:
    """{"image" | "video": data URI} of a /predict vision_path: fetched, and what it holds decided from its bytes
    (within the operator's pixel, frame and duration limits) rather than from a name a URL may not have."""
    data = fetch(vision_path, "vision_path", settings)
    limits = settings.limits
    info = probe_media(
        data,
        "vision_path",
        max_pixels=limits.max_input_pixels,
        max_frames=limits.max_input_frames,
        max_seconds=limits.max_input_seconds,
    )
    return {info.kind: f"data:{info.kind}/*;base64,{base64.b64encode(data).decode()}"}
