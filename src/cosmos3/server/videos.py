"""vLLM-Omni video routes: `POST /v1/videos[/sync]` (multipart form), and the async job's GET / list / content /
DELETE. Wire rules live here (`size` -> width/height, `seconds` -> num_frames, references -> files, action-mode
frame counts); defaults and bounds are the dialect's and the request model's."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from cosmos3.generation.dialects import ACTION_MODES, MODE_ALIASES
from cosmos3.server.errors import ERRORS, APIError, ErrorBody
from cosmos3.server.inputs import fetch, read_upload, store_action_files, store_media
from cosmos3.server.jobs import ACTIVE, FINAL, Job, new_id
from cosmos3.server.state import ServerState, state
from cosmos3.server.submit import open_output, read_output, resolve, wait_for_jobs, wire_name
from cosmos3.server.wire import (
    SIZE_PATTERN,
    VLLM_WIRE,
    Text,
    check_guardrails_request,
    check_model,
    check_sequence_length,
    load_json,
    merge_fields,
    parse_extra,
)

router = APIRouter()


# ---------------------------------------------------------------------------------------------- replies
class JobError(BaseModel):
    code: int
    message: str
    param: str | None = None


class ActionData(BaseModel):
    data: list[list[float]]
    shape: list[int]
    dtype: str
    raw_action_dim: int | None = None
    action_mode: str | None = None
    domain_id: int | None = None
    action_space: str | None = None


class VideoJob(BaseModel):
    id: str
    object: Literal["video"] = "video"
    status: str  # queued, in_progress, cancelling, completed, failed, cancelled
    progress: int
    model: str
    prompt: str | None = None
    size: str | None = None
    seconds: str | None = None
    quality: str = "default"
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    duration_s: float | None = None
    media_type: str = "video/mp4"
    file_name: str | None = None
    seed: int | None = None
    error: JobError | None = None
    remixed_from_video_id: str | None = None
    action: ActionData | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    deleted: bool
    object: Literal["video.deleted"] = "video.deleted"


def job_object(job: Job, server: ServerState) -> VideoJob:
    info, result, settings = job.info, job.result, server.settings
    action = None
    if "action" in result:
        data, meta = result["action"], result.get("action_meta", {})
        action = ActionData(
            data=data,
            shape=[len(data), len(data[0]) if data else 0],
            dtype="float32",
            raw_action_dim=meta.get("raw_action_dim"),
            action_mode=info.get("mode"),
            domain_id=meta.get("domain_id"),
            action_space=meta.get("action_space"),
        )
    return VideoJob(
        id=job.id,
        status=job.status,
        progress=job.progress,
        model=settings.model_name,
        prompt=info.get("prompt"),
        size=info.get("size"),
        seconds=info.get("seconds"),
        created_at=int(job.created_at),
        completed_at=int(job.completed_at) if job.completed_at else None,
        expires_at=int(job.completed_at + settings.retention_s) if job.completed_at else None,
        fps=result.get("fps", info.get("fps")),
        num_frames=result.get("num_frames", info.get("num_frames")),
        duration_s=result["num_frames"] / result["fps"] if "num_frames" in result else None,
        file_name=f"{job.id}.mp4" if job.status == "completed" else None,
        seed=job.request.get("seed"),
        error=JobError(**{**job.error, "param": wire_name(job, job.error.get("param"))}) if job.error else None,
        action=action,
    )


# ---------------------------------------------------------------------------------------------- the form
FORM_FIELDS = {
    "prompt",
    "model",
    "negative_prompt",
    "size",
    "width",
    "height",
    "num_frames",
    "fps",
    "seconds",
    "num_inference_steps",
    "guidance_scale",
    "flow_shift",
    "seed",
    "generate_sound",
    "sound_duration",
    "input_reference",
    "image_reference",
    "video_reference",
    "extra_params",
    "extra_args",
    "max_sequence_length",
}


@dataclass
class VideoForm:
    prompt: str
    model: str | None
    negative_prompt: str | None
    size: str | None
    width: int | None
    height: int | None
    num_frames: int | None
    fps: float | None
    seconds: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    flow_shift: float | None
    seed: int | None
    generate_sound: bool | None
    sound_duration: float | None
    image_reference: str | None
    video_reference: str | None
    extra_params: str | None
    extra_args: str | None
    max_sequence_length: int | None
    upload: bytes | None = None


async def video_form(
    request: Request,
    prompt: Text | None = Form(None),  # required; None here so that an empty prompt is not read as a missing one
    model: str | None = Form(None),
    negative_prompt: Text | None = Form(None),
    size: str | None = Form(None, pattern=SIZE_PATTERN),
    width: int | None = Form(None),
    height: int | None = Form(None),
    num_frames: int | None = Form(None),
    fps: float | None = Form(None),
    seconds: int | None = Form(None, description="a positive integer; num_frames = seconds x fps"),
    num_inference_steps: int | None = Form(None),
    guidance_scale: float | None = Form(None),
    flow_shift: float | None = Form(None),
    seed: int | None = Form(None),
    generate_sound: bool | None = Form(None),
    sound_duration: float | None = Form(None),
    input_reference: UploadFile | None = File(None),
    image_reference: str | None = Form(None, description='JSON like {"image_url": "https://..."}'),
    video_reference: str | None = Form(None, description='JSON like {"video_url": "https://..."}'),
    extra_params: str | None = Form(None, description="JSON object of Cosmos-specific keys"),
    extra_args: str | None = Form(None, description="alias of extra_params"),
    max_sequence_length: int | None = Form(None),
) -> VideoForm:
    """The form fields of both create routes (a dependency, so that they are declared once)."""
    sent = (await request.form()).keys()
    unknown = sorted(set(sent) - FORM_FIELDS)
    if unknown:
        raise APIError(
            400, f"form field {unknown[0]!r} is not supported; allowed: {', '.join(sorted(FORM_FIELDS))}", unknown[0]
        )
    if prompt is None:  # FastAPI reads an empty form value as absent; an empty prompt is a prompt, as on /images
        if "prompt" not in sent:
            raise APIError(400, "prompt is required (a text form field; it may be empty)", "prompt")
        prompt = ""
    upload = None
    if input_reference is not None and input_reference.filename:
        upload = await read_upload(input_reference, "input_reference", state(request).settings)
    fields = {k: v for k, v in locals().items() if k in VideoForm.__dataclass_fields__}
    return VideoForm(**fields)


def queue_video(server: ServerState, form: VideoForm) -> Job:
    """Validate and resolve the form, store its media, queue the job (blocking: runs in the inputs pool)."""
    settings, engine, worker = server.settings, server.engine, server.worker
    check_model(form.model, settings)
    extra = parse_extra(form.extra_params, form.extra_args)
    check_guardrails_request(engine, extra)
    if form.max_sequence_length is not None:
        check_sequence_length(engine, form.prompt, form.max_sequence_length, "max_sequence_length")
    check_sequence_length(engine, form.prompt, extra.pop("max_sequence_length", None))
    sound_duration = form.sound_duration
    for key in ("sound_duration", "audio_duration"):
        value = extra.pop(key, None)
        sound_duration = value if sound_duration is None and value is not None else sound_duration
    if form.seconds is not None and form.seconds < 1:
        raise APIError(400, f"seconds={form.seconds} must be a positive integer", "seconds")
    job_id = new_id()
    folder = worker.job_dir(job_id) / "inputs"
    try:
        kind, path = references(server, form, folder)
        top = {
            "prompt": form.prompt,
            "negative_prompt": form.negative_prompt,
            "width": form.width,
            "height": form.height,
            "size": form.size,
            "num_frames": form.num_frames,
            "fps": form.fps,
            "num_inference_steps": form.num_inference_steps,
            "guidance_scale": form.guidance_scale,
            "flow_shift": form.flow_shift,
            "seed": form.seed,
            "generate_sound": form.generate_sound,
        }
        fields, wire = merge_fields(top, extra, "vllm_omni")
        wire = {**VLLM_WIRE, **wire}
        store_action_files(fields, wire, folder, server.settings)
        apply_mode(fields, wire, kind, form)
        if kind is not None:
            fields[kind] = str(path)
        req = resolve(server, fields, "vllm_omni", wire)
        if sound_duration is not None and not req.is_action:
            video_s = req.num_frames / req.fps
            # written so that NaN fails it (every comparison with NaN is False)
            if not (isinstance(sound_duration, (int, float)) and abs(float(sound_duration) - video_s) <= 1.0 / req.fps):
                raise APIError(
                    400,
                    f"sound_duration={sound_duration!r} must equal the video's {video_s:.3f} s "
                    "(the sound is generated jointly with the video)",
                    "sound_duration",
                )
        info = {
            "prompt": form.prompt,
            "size": f"{req.width}x{req.height}" if req.width else None,
            "seconds": str(form.seconds) if form.seconds is not None else f"{req.num_frames / req.fps:g}",
            "fps": req.fps,
            "num_frames": req.num_frames,
            "mode": req.mode,
            "wire": {k: v for k, v in wire.items() if k != v},
        }
        return worker.submit("videos", req.__dict__, info, job_id)
    except BaseException:
        shutil.rmtree(worker.job_dir(job_id), ignore_errors=True)
        raise


def references(server: ServerState, form: VideoForm, folder) -> tuple[str | None, Any]:
    """At most one of input_reference (upload), image_reference, video_reference -> (kind, stored path)."""
    refs = []
    if form.upload is not None:
        refs.append(store_media(form.upload, folder, "input_reference", server.settings))
    for name, raw, key in (
        ("image_reference", form.image_reference, "image_url"),
        ("video_reference", form.video_reference, "video_url"),
    ):
        if raw:
            like = f'JSON like {{"{key}": "https://..."}}'
            try:
                url = load_json(raw, name, like)[key]
                url = url["url"] if isinstance(url, dict) else url
            except (KeyError, TypeError) as exc:
                raise APIError(400, f"{name} must be {like}", name) from exc
            data = fetch(url, name, server.settings)
            refs.append(store_media(data, folder, name, server.settings, expect=key.split("_")[0]))
    if len(refs) > 1:
        raise APIError(
            400, "send one reference: input_reference, image_reference or video_reference", "input_reference"
        )
    return (refs[0][1], refs[0][0]) if refs else (None, None)


def apply_mode(fields: dict, wire: dict, kind: str | None, form: VideoForm) -> None:
    """The mode from extra_params.action_mode or the reference; vLLM-Omni's frame-count rules per mode."""
    mode = fields.get("mode")
    if isinstance(mode, str):
        mode = MODE_ALIASES.get(mode.lower(), mode.lower())
    if mode is not None and mode not in ACTION_MODES:
        param = wire.get("mode", "extra_params.action_mode")
        raise APIError(400, f"{param}={mode!r} is not one of {', '.join(ACTION_MODES)}", param)
    if mode is not None:
        fields["mode"] = mode
        if "width" in fields or "height" in fields:
            param = wire.get("width") or wire.get("height")
            raise APIError(
                400, f"{param} is not used in action modes: the canvas comes from extra_params.image_size", param
            )
        chunk, frames = fields.get("action_chunk_size", 16), fields.get("num_frames")
        if frames is not None and isinstance(chunk, int):
            if frames not in (chunk, chunk + 1):
                param = wire.get("num_frames", "num_frames")
                raise APIError(400, f"{param}={frames!r} must be action_chunk_size ({chunk}) or one more", param)
            del fields["num_frames"]  # the request model takes chunk + 1
        return
    fields["mode"] = {"image": "image2video", "video": "video2video"}.get(kind, "text2video")
    fps = fields.get("fps", 24)
    finite = isinstance(fps, (int, float)) and math.isfinite(fps)  # else the request model refuses fps by name
    if "num_frames" not in fields and form.seconds is not None and finite:
        fields["num_frames"] = int(form.seconds * fps)
    indexes = fields.get("condition_frame_indexes_vision")
    if isinstance(indexes, (int, str)) and not isinstance(indexes, bool):
        try:
            fields["condition_frame_indexes_vision"] = [int(v) for v in str(indexes).split(",") if v.strip()]
        except ValueError as exc:
            param = wire.get("condition_frame_indexes_vision")
            raise APIError(400, f"{param}={indexes!r} is not a list of integers", param) from exc


# ---------------------------------------------------------------------------------------------- routes
@router.post("/v1/videos", response_model=VideoJob)
async def create_video(request: Request, form: VideoForm = Depends(video_form)):
    """Queue a generation job (poll `GET /v1/videos/{id}`, download `/content`)."""
    server = state(request)
    job = await server.blocking(queue_video, server, form)
    return job_object(job, server)


MP4 = {200: {"content": {"video/mp4": {}}, "description": "The MP4 (AAC muxed when there is sound)"}}


@router.post("/v1/videos/sync", response_class=Response, responses=MP4)
async def create_video_sync(request: Request, form: VideoForm = Depends(video_form)):
    """Generate and return the MP4 (actions are only in the async job object). Closing the connection cancels."""
    server = state(request)
    job = await server.blocking(queue_video, server, form)
    (done,) = await wait_for_jobs(request, server, [job])
    data = await run_in_threadpool(read_output, done)
    headers = {
        "X-Request-Id": done.id,
        "X-Model": server.settings.model_name,
        "X-Inference-Time-S": f"{(done.completed_at or time.time()) - done.created_at:.3f}",
        "X-Seed": str(done.request.get("seed")),
    }
    return Response(data, media_type="video/mp4", headers=headers)


def get_job(server: ServerState, video_id: str) -> Job:
    job = server.store.get(video_id)
    if job is None or job.dialect != "videos":
        raise APIError(404, "Video not found", "video_id")
    return job


@router.get("/v1/videos", response_model=VideoList)
def list_videos(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=0, le=100),
    order: Literal["asc", "desc"] = "desc",
):
    server = state(request)
    jobs = server.store.list("videos")
    if order == "desc":
        jobs.reverse()
    if after:
        ids = [j.id for j in jobs]
        if after not in ids:  # an empty page would read as the end of the list
            raise APIError(404, f"after={after!r} is not a video job of this server (deleted, or never made)", "after")
        jobs = jobs[ids.index(after) + 1 :]
    page = jobs[:limit]
    return VideoList(
        data=[job_object(j, server) for j in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(jobs) > len(page),
    )


# A failed job is answered with its own code (as vLLM-Omni does), and with the job object as the body.
FAILED = {code: {"model": VideoJob | ErrorBody, "description": ERRORS[code]["description"]} for code in (400, 500)}


@router.get("/v1/videos/{video_id}", response_model=VideoJob, responses=FAILED)
def get_video(request: Request, video_id: str):
    server = state(request)
    job = get_job(server, video_id)
    body = job_object(job, server)
    if job.status == "failed":
        return JSONResponse(body.model_dump(mode="json"), status_code=(job.error or {}).get("code", 500))
    return body


@router.get("/v1/videos/{video_id}/content", response_class=StreamingResponse, responses=MP4)
def get_video_content(request: Request, video_id: str):
    job = get_job(state(request), video_id)
    if job.status in ACTIVE:
        raise APIError(404, "Generation is still in-progress", "video_id")
    if job.status != "completed":
        raise APIError(422, f"the job is {job.status}; it has no content", "video_id")
    chunks, size = open_output(job)
    headers = {"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{job.id}.mp4"'}
    return StreamingResponse(chunks, media_type="video/mp4", headers=headers)


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
async def delete_video(request: Request, video_id: str):
    """Cancel and delete a job. A running job stops at its next denoising step: if it has not stopped within the
    abort timeout the answer is 409 and the job shows `cancelling` (then `cancelled`); DELETE again to remove it."""
    server = state(request)
    job = await server.blocking(get_job, server, video_id)
    if job.status in ACTIVE:
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()

        def done() -> None:
            try:
                loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))
            except RuntimeError:
                pass

        waiting = await server.blocking(server.worker.when_done, video_id, done)
        status = await server.blocking(server.worker.cancel, video_id)
        if status == "cancelling" and waiting:
            try:
                await asyncio.wait_for(stopped, server.settings.abort_timeout_s)
            except TimeoutError:
                pass
            finally:
                server.inputs.submit(server.worker.forget, video_id, done)
        job = await server.blocking(get_job, server, video_id)
        if job.status not in FINAL:
            raise APIError(
                409,
                f"video {video_id} is cancelling: it stops at its next denoising step; DELETE it again once it has",
                "video_id",
            )
    await server.blocking(remove, server, video_id)
    return VideoDeleted(id=video_id, deleted=True)


def remove(server: ServerState, job_id: str) -> None:
    shutil.rmtree(server.worker.job_dir(job_id), ignore_errors=True)
    server.store.delete(job_id)
