"""The OpenAI / vLLM-Omni dialect: images, videos (sync and async jobs), chat completions, models."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import queue
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cosmos3.errors import RequestError
from cosmos3.generation.dialects import ACTION_MODES
from cosmos3.reasoning.reasoner import Sampling
from cosmos3.server.app import APIError, Settings, check_limits
from cosmos3.server.inputs import check_model, fetch, save_upload
from cosmos3.server.jobs import Job

router = APIRouter()

# vLLM-Omni's per-mode defaults (steps, guidance, shift), its seed when none is sent, and templates off.
VLLM_DEFAULTS = {"text2image": (50, 7.0, 3.0), "video": (35, 6.0, 10.0), "action": (30, 1.0, 5.0)}
VLLM_SEED = 42

# extra_params / extra_args keys -> request fields (vLLM-Omni names).
EXTRA_FIELDS = {
    "use_resolution_template": "use_resolution_template",
    "use_duration_template": "use_duration_template",
    "use_system_prompt": "use_system_prompt",
    "flow_shift": "shift",
    "condition_frame_indexes_vision": "condition_frame_indexes_vision",
    "condition_video_keep": "condition_video_keep",
    "action_mode": "mode",
    "domain_name": "domain_name",
    "raw_action_dim": "raw_action_dim",
    "action_chunk_size": "action_chunk_size",
    "action": "action",
    "image_size": "resolution",
    "resolution": "resolution",
    "view_point": "view_point",
    "generate_sound": "enable_sound",
    "sound_gen": "enable_sound",
    "fps": "fps",
}
EXTRA_CHECKED = ("max_sequence_length", "action_path", "sound_duration", "audio_duration", "guardrails")


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def parse_extra(extra_params: str | dict | None, extra_args: str | dict | None) -> dict[str, Any]:
    """Merge `extra_params` and `extra_args` (JSON objects); a key in both, or an unknown key, is an error."""
    merged: dict[str, Any] = {}
    for name, raw in (("extra_params", extra_params), ("extra_args", extra_args)):
        if raw is None or raw == "":
            continue
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise APIError(400, f"{name} is not valid JSON: {exc}", name) from exc
        if not isinstance(raw, dict):
            raise APIError(400, f"{name} must be a JSON object", name)
        for key, value in raw.items():
            if key in merged:
                raise APIError(400, f"{key} is given in both extra_params and extra_args", f"{name}.{key}")
            if key not in EXTRA_FIELDS and key not in EXTRA_CHECKED:
                allowed = ", ".join(sorted([*EXTRA_FIELDS, *EXTRA_CHECKED]))
                raise APIError(400, f"{name}.{key} is not supported; allowed: {allowed}", f"{name}.{key}")
            merged[key] = value
    return merged


def apply_extra(fields: dict[str, Any], extra: dict[str, Any], folder, settings: Settings) -> None:
    for key, value in extra.items():
        if key in EXTRA_FIELDS:
            if key == "condition_frame_indexes_vision" and isinstance(value, (int, str)):
                try:
                    value = [int(v) for v in str(value).split(",") if v.strip()]
                except ValueError as exc:
                    raise APIError(400, f"extra_params.{key}={value!r} is not a list of integers", key) from exc
            if key == "action_mode" and isinstance(value, str):
                value = "policy" if value.lower() == "wam" else value.lower()
            fields[EXTRA_FIELDS[key]] = value
    if "action_path" in extra:
        fields["action"] = str(fetch(extra["action_path"], folder, "extra_params.action_path", settings)[0])
    if extra.get("guardrails") not in (None, False, True):
        raise APIError(400, "extra_params.guardrails must be true or false", "extra_params.guardrails")
    if extra.get("guardrails") is not None:
        fields["enable_safety_check"] = extra["guardrails"]


def check_guardrails_request(engine, extra: dict[str, Any]) -> None:
    """`guardrails: true` cannot turn checks on for a server started without them: say so instead of ignoring it."""
    if extra.get("guardrails") is True and (engine.generator is None or engine.generator.guardrail is None):
        raise APIError(
            400,
            "extra_params.guardrails=true, but this server runs without guardrails "
            "(--no-guardrails or a checkpoint without a safety checker)",
            "extra_params.guardrails",
        )


def check_prompt_length(engine, prompt: str, limit: Any) -> None:
    """`max_sequence_length` never truncates: a longer prompt is an error that says by how much."""
    if limit is None:
        return
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise APIError(400, f"max_sequence_length={limit!r} must be a positive integer", "max_sequence_length")
    tokenizer = (engine.generator or engine.reasoner).tokenizer
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n > limit:
        raise APIError(400, f"prompt has {n} tokens, more than max_sequence_length={limit}", "prompt")


def job_object(job: Job, settings: Settings) -> dict[str, Any]:
    info, result = job.info, job.result
    body: dict[str, Any] = {
        "id": job.id,
        "object": "video",
        "status": job.status,
        "progress": job.progress,
        "model": settings.model_name,
        "prompt": info.get("prompt"),
        "size": info.get("size"),
        "seconds": info.get("seconds"),
        "quality": "default",
        "created_at": int(job.created_at),
        "completed_at": int(job.completed_at) if job.completed_at else None,
        "expires_at": int(job.completed_at + settings.retention_s) if job.completed_at else None,
        "fps": result.get("fps", info.get("fps")),
        "num_frames": result.get("num_frames", info.get("num_frames")),
        "duration_s": (result["num_frames"] / result["fps"]) if "num_frames" in result else None,
        "media_type": "video/mp4",
        "file_name": f"{job.id}.mp4" if job.status == "completed" else None,
        "error": job.error,
        "remixed_from_video_id": None,
        "action": None,
    }
    if "action" in result:
        data = result["action"]
        meta = result.get("action_meta", {})
        body["action"] = {
            "data": data,
            "shape": [len(data), len(data[0]) if data else 0],
            "dtype": "float32",
            "raw_action_dim": meta.get("raw_action_dim"),
            "action_mode": info.get("mode"),
            "domain_id": meta.get("domain_id"),
            "action_space": meta.get("action_space"),
        }
    return body


def failed_response(job: Job) -> APIError:
    error = job.error or {}
    return APIError(error.get("code", 500), error.get("message", "generation failed"), error.get("param"))


async def finished(request: Request, job: Job) -> Job:
    """Wait for a synchronous route's job; a timeout cancels it (504), a failure becomes its error response."""
    settings, worker = settings_of(request), request.app.state.worker
    done = await run_in_threadpool(worker.wait, job.id, settings.sync_timeout_s)
    if done is None:
        worker.cancel(job.id)
        raise APIError(504, f"generation did not finish within {settings.sync_timeout_s:.0f} s")
    if done.status != "completed":
        raise failed_response(done)
    return done


# ---------------------------------------------------------------------------------------------------- images
class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, pattern=r"^\d+x\d+$")
    response_format: Literal["b64_json", "file"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=20)
    flow_shift: float | None = Field(None, gt=0, le=1000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    extra_params: dict[str, Any] | None = None
    extra_args: dict[str, Any] | None = None
    user: str | None = None


@router.post("/v1/images/generations")
async def images_generations(body: ImageGenerationRequest, request: Request):
    settings, worker = settings_of(request), request.app.state.worker
    check_model(body.model, settings)
    if body.response_format == "file" and body.n > 1:
        raise APIError(400, "response_format='file' returns one image; use n=1 or b64_json", "response_format")
    steps, guidance, shift = VLLM_DEFAULTS["text2image"]
    width, height = (int(v) for v in (body.size or "1024x1024").split("x"))
    extra = parse_extra(body.extra_params, body.extra_args)
    check_guardrails_request(request.app.state.engine, extra)
    check_prompt_length(request.app.state.engine, body.prompt, extra.get("max_sequence_length"))
    seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "big")
    jobs = []
    for i in range(body.n):
        job_id = f"img_{uuid.uuid4().hex}"
        fields: dict[str, Any] = {
            "mode": "text2image",
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "width": width,
            "height": height,
            "num_steps": body.num_inference_steps or steps,
            "guidance": body.guidance_scale if body.guidance_scale is not None else guidance,
            "shift": body.flow_shift or shift,
            "seed": seed + i,
            "use_resolution_template": False,
            "use_duration_template": False,
            "use_system_prompt": False,
        }
        apply_extra(fields, extra, worker.job_dir(job_id) / "inputs", settings)
        if fields["mode"] != "text2image":
            raise APIError(
                400, "extra_params.action_mode does not apply to /v1/images/generations", "extra_params.action_mode"
            )
        resolved = request.app.state.engine.request(**fields)
        check_limits(resolved, settings)
        request_fields = resolved.__dict__
        ext = {"jpeg": "jpg"}.get(body.output_format, body.output_format)
        jobs.append(worker.submit("images", request_fields, {"prompt": body.prompt, "image_format": ext}, job_id))
    data = []
    for job in jobs:
        path = (await finished(request, job)).outputs[0]
        if body.response_format == "file":
            return FileResponse(path, media_type=f"image/{body.output_format}")
        with open(path, "rb") as f:
            data.append({"b64_json": base64.b64encode(f.read()).decode(), "url": None, "revised_prompt": None})
    return {"created": int(time.time()), "data": data, "output_format": body.output_format, "size": f"{width}x{height}"}


# ---------------------------------------------------------------------------------------------------- videos
VIDEO_FORM_FIELDS = {
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


async def video_job(
    request: Request,
    prompt: str = Form(...),
    model: str | None = Form(None),
    negative_prompt: str | None = Form(None),
    size: str | None = Form(None, pattern=r"^\d+x\d+$"),
    width: int | None = Form(None, ge=16, le=4096),
    height: int | None = Form(None, ge=16, le=4096),
    num_frames: int | None = Form(None, ge=1, le=1000),
    fps: float | None = Form(None, ge=1, le=120),
    seconds: int | None = Form(None, ge=1, le=60),
    num_inference_steps: int | None = Form(None, ge=1, le=200),
    guidance_scale: float | None = Form(None, ge=0, le=20),
    flow_shift: float | None = Form(None, gt=0, le=1000),
    seed: int | None = Form(None, ge=0, le=2**63 - 1),
    generate_sound: bool | None = Form(None),
    sound_duration: float | None = Form(None, gt=0, le=60),
    input_reference: UploadFile | None = File(None),
    image_reference: str | None = Form(None, description='JSON like {"image_url": "https://..."}'),
    video_reference: str | None = Form(None, description='JSON like {"video_url": "https://..."}'),
    extra_params: str | None = Form(None, description="JSON object of Cosmos-specific keys"),
    extra_args: str | None = Form(None, description="alias of extra_params"),
    max_sequence_length: int | None = Form(None, ge=1),
) -> Job:
    """The form fields of both video routes -> a queued job (a FastAPI dependency, so the fields are declared once)."""
    settings, worker, engine = settings_of(request), request.app.state.worker, request.app.state.engine
    form = await request.form()
    unknown = sorted(set(form.keys()) - VIDEO_FORM_FIELDS)
    if unknown:
        raise APIError(
            400,
            f"form field {unknown[0]!r} is not supported; allowed: {', '.join(sorted(VIDEO_FORM_FIELDS))}",
            unknown[0],
        )
    check_model(model, settings)
    extra = parse_extra(extra_params, extra_args)
    check_guardrails_request(engine, extra)
    check_prompt_length(engine, prompt, max_sequence_length or extra.get("max_sequence_length"))
    job_id = f"video_gen_{uuid.uuid4().hex}"
    folder = worker.job_dir(job_id) / "inputs"

    refs: list[tuple[str, Any]] = []
    if input_reference is not None and input_reference.filename:
        refs.append(await save_upload(input_reference, folder, "input_reference", settings))
    for name, raw, key in (
        ("image_reference", image_reference, "image_url"),
        ("video_reference", video_reference, "video_url"),
    ):
        if raw:
            try:
                url = json.loads(raw)[key]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise APIError(400, f'{name} must be JSON like {{"{key}": "https://..."}}', name) from exc
            refs.append(fetch(url, folder, name, settings))
    if len(refs) > 1:
        raise APIError(
            400, "send one reference: input_reference, image_reference or video_reference", "input_reference"
        )

    fields: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "use_resolution_template": False,
        "use_duration_template": False,
    }
    apply_extra(fields, extra, folder, settings)
    action = fields.get("mode") in ACTION_MODES
    if fields.get("mode") is not None and not action:
        raise APIError(
            400,
            f"extra_params.action_mode={fields['mode']!r} is not one of {', '.join(ACTION_MODES)}",
            "extra_params.action_mode",
        )
    kind = refs[0][1] if refs else None
    if refs:
        fields[kind] = str(refs[0][0])
    if not action:
        fields["mode"] = {"image": "image2video", "video": "video2video"}.get(kind, "text2video")
        fields.setdefault("use_system_prompt", fields["mode"] == "video2video")
    else:
        fields.setdefault("use_system_prompt", False)
    steps, guidance, shift = VLLM_DEFAULTS["action" if action else "video"]
    fields["num_steps"] = num_inference_steps or steps
    fields["guidance"] = guidance_scale if guidance_scale is not None else guidance
    fields["shift"] = flow_shift or fields.get("shift") or shift
    fields["seed"] = seed if seed is not None else VLLM_SEED
    fields["fps"] = fps or fields.get("fps") or 24.0
    if generate_sound is not None:
        fields["enable_sound"] = generate_sound
    if size:
        width, height = (int(v) for v in size.split("x"))
    if action:
        fields.setdefault("resolution", "480")
        if width or height:
            raise APIError(
                400, "size is not used in action modes: the canvas comes from extra_params.image_size", "size"
            )
        if num_frames is not None:
            chunk = fields.get("action_chunk_size", 16)
            if num_frames not in (chunk, chunk + 1):
                raise APIError(
                    400, f"num_frames={num_frames} must be action_chunk_size ({chunk}) or one more", "num_frames"
                )
    else:
        if num_frames is None and seconds is not None:
            num_frames = int(seconds * fields["fps"])
        num_frames = num_frames or 189
        fields["num_frames"] = 4 * math.ceil((num_frames - 1) / 4) + 1  # vLLM-Omni rounds up to 4k+1
        if not width and fields["mode"] == "text2video":
            width, height = 1280, 720
        elif not width:
            width, height = default_reference_size(refs[0][0], kind)
        fields["width"], fields["height"] = width, height
    duration = (
        sound_duration if sound_duration is not None else extra.get("sound_duration", extra.get("audio_duration"))
    )
    if duration is not None and not action:
        video_s = fields["num_frames"] / fields["fps"]
        if abs(float(duration) - video_s) > 1.0 / fields["fps"]:
            raise APIError(
                400,
                f"sound_duration={duration} must equal the video's {video_s:.3f} s "
                "(the sound is generated jointly with the video)",
                "sound_duration",
            )
    resolved = engine.request(**fields)  # validation errors become 400 with the field named
    check_limits(resolved, settings)
    info = {
        "prompt": prompt,
        "size": f"{resolved.width}x{resolved.height}" if resolved.width else None,
        "seconds": str(seconds) if seconds is not None else "4",
        "fps": resolved.fps,
        "num_frames": resolved.num_frames,
        "mode": resolved.mode,
    }
    return worker.submit("videos", resolved.__dict__, info, job_id)


def default_reference_size(path, kind: str) -> tuple[int, int]:
    """About 720p of area with the reference's aspect ratio, in multiples of 16 (vLLM-Omni's I2V/V2V default)."""
    from cosmos3 import media

    w, h = media.load_image(path).size if kind == "image" else media.load_video(path)[0][0].size
    scale = math.sqrt(1280 * 720 / (w * h))
    return max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16)


@router.post("/v1/videos")
async def create_video(request: Request, job: Job = Depends(video_job)):
    """Create an async generation job (poll `GET /v1/videos/{id}`, download `/content`)."""
    return job_object(job, settings_of(request))


@router.post(
    "/v1/videos/sync",
    response_class=Response,
    responses={200: {"content": {"video/mp4": {}}, "description": "The MP4 (AAC muxed with sound)"}},
)
async def create_video_sync(request: Request, job: Job = Depends(video_job)):
    """Generate and return the MP4 in the response (actions are only in the async job object)."""
    settings = settings_of(request)
    done = await finished(request, job)
    with open(done.outputs[0], "rb") as f:
        data = f.read()
    return Response(
        data,
        media_type="video/mp4",
        headers={
            "X-Request-Id": done.id,
            "X-Model": settings.model_name,
            "X-Inference-Time-S": f"{(done.completed_at or time.time()) - done.created_at:.3f}",
        },
    )


def _get_job(request: Request, video_id: str) -> Job:
    job = request.app.state.store.get(video_id)
    if job is None or job.dialect != "videos":
        raise APIError(404, "Video not found", "video_id")
    return job


@router.get("/v1/videos")
def list_videos(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=0, le=100),
    order: Literal["asc", "desc"] = "desc",
):
    settings = settings_of(request)
    jobs = request.app.state.store.list("videos")
    if order == "desc":
        jobs.reverse()
    if after:
        ids = [j.id for j in jobs]
        jobs = jobs[ids.index(after) + 1 :] if after in ids else []
    page = jobs[:limit]
    return {
        "object": "list",
        "data": [job_object(j, settings) for j in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(jobs) > len(page),
    }


@router.get("/v1/videos/{video_id}")
def get_video(request: Request, video_id: str):
    job = _get_job(request, video_id)
    body = job_object(job, settings_of(request))
    status = (job.error or {}).get("code", 500) if job.status == "failed" else 200  # as vLLM-Omni does
    return JSONResponse(body, status_code=status)


@router.get(
    "/v1/videos/{video_id}/content",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}}, "description": "The generated MP4"}},
)
def get_video_content(request: Request, video_id: str):
    job = _get_job(request, video_id)
    if job.status in ("queued", "in_progress"):
        raise APIError(404, "Generation is still in-progress", "video_id")
    if job.status != "completed":
        raise APIError(422, f"the job is {job.status}; it has no content", "video_id")
    return FileResponse(job.outputs[0], media_type="video/mp4", filename=f"{job.id}.mp4")


@router.delete("/v1/videos/{video_id}")
def delete_video(request: Request, video_id: str):
    """Cancel a queued or running job (it stops at its next step), or delete a finished one and its files."""
    job = _get_job(request, video_id)
    worker = request.app.state.worker
    if job.status in ("queued", "in_progress"):
        worker.cancel(job.id)
    else:
        import shutil

        shutil.rmtree(worker.job_dir(job.id), ignore_errors=True)
        request.app.state.store.delete(job.id)
    return {"id": job.id, "deleted": True, "object": "video.deleted"}


# ---------------------------------------------------------------------------------------------------- chat
class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=131072)
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    user: str | None = None


def chat_settings(body: ChatCompletionRequest) -> tuple[Sampling, dict[str, Any]]:
    sampling = Sampling(
        max_tokens=body.max_completion_tokens or body.max_tokens or 256,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "big"),
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
    )
    encode: dict[str, Any] = {}
    for name, kwargs in (
        ("media_io_kwargs", (body.media_io_kwargs or {}).get("video", {})),
        ("mm_processor_kwargs", body.mm_processor_kwargs or {}),
    ):
        for key, value in kwargs.items():
            if key == "fps":
                encode["video_fps"] = float(value)
            elif key == "num_frames" and value != -1:
                encode["video_num_frames"] = int(value)
            elif key not in ("do_sample_frames", "num_frames"):
                raise APIError(400, f"{name}.{key} is not supported; supported: fps, num_frames", f"{name}.{key}")
    return sampling, encode


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    settings, engine, worker = settings_of(request), request.app.state.engine, request.app.state.worker
    check_model(body.model, settings)
    if engine.reasoner is None:
        raise APIError(400, "this server was started without the Reasoner", "model")
    sampling, encode = chat_settings(body)
    sampling.check()
    if sampling.max_tokens > settings.max_tokens:
        raise APIError(
            400, f"max_tokens={sampling.max_tokens} exceeds this server's limit of {settings.max_tokens}", "max_tokens"
        )
    reasoner = engine.reasoner
    created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

    if not body.stream:

        def run():
            with worker.engine_lock:
                return reasoner.complete([body.messages], sampling, **encode)[0]

        reply = await run_in_threadpool(run)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": settings.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
        }

    # Validate and encode before streaming starts, so that bad input is a 400 rather than a broken stream.
    pieces: queue.Queue = queue.Queue()

    def produce():
        try:
            with worker.engine_lock:
                for piece in reasoner.stream(body.messages, sampling, **encode):
                    pieces.put(("piece", piece))
            pieces.put(("end", None))
        except RequestError as exc:
            pieces.put(("error", exc))
        except Exception as exc:  # reported in the stream; the server keeps running
            pieces.put(("error", exc))

    with worker.engine_lock:
        await run_in_threadpool(reasoner.encode, body.messages, **encode)
    threading.Thread(target=produce, daemon=True).start()

    def chunk(delta: dict, finish: str | None = None) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": settings.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data)}\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await asyncio.to_thread(pieces.get)
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "end":
                yield chunk({}, "stop")
                break
            else:
                err = {
                    "error": {
                        "message": str(value),
                        "type": "BadRequestError" if isinstance(value, RequestError) else "InternalServerError",
                    }
                }
                yield f"data: {json.dumps(err)}\n\n"
                break
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/v1/models")
def models(request: Request):
    settings = settings_of(request)
    return {
        "object": "list",
        "data": [
            {
                "id": settings.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "cosmos3",
                "root": str(request.app.state.engine.path),
            }
        ],
    }
