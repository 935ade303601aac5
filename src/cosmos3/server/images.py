"""`POST /v1/images/generations`: OpenAI / vLLM-Omni text2image."""

from __future__ import annotations

import base64
import io
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from cosmos3.generation.dialects import defaults_for
from cosmos3.server.errors import APIError
from cosmos3.server.jobs import Job, new_id
from cosmos3.server.state import ServerState, state
from cosmos3.server.submit import read_output, resolve, wait_for_jobs
from cosmos3.server.wire import (
    SIZE_PATTERN,
    VLLM_WIRE,
    Int,
    Text,
    check_guardrails_request,
    check_model,
    check_sequence_length,
    merge_fields,
    parse_extra,
)

router = APIRouter()


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    model: str | None = None
    n: Int = Field(1, ge=1, le=10, description="images, each with seed + i (mod 2**63)")
    size: str | None = Field(None, pattern=SIZE_PATTERN)
    response_format: Literal["b64_json", "file"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Int = Field(100, ge=0, le=100, description="JPEG / WebP quality")
    negative_prompt: Text | None = None
    num_inference_steps: Int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    seed: Int | None = Field(None, description="random when omitted; every reply says the seed used")
    extra_params: dict[str, Any] | None = None
    extra_args: dict[str, Any] | None = None
    user: str | None = None


class ImageData(BaseModel):
    b64_json: str
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    seed: int


FILE_REPLY = {"content": {f"image/{f}": {} for f in ("png", "jpeg", "webp")}, "description": "response_format=file"}


@router.post("/v1/images/generations", response_model=ImagesResponse, responses={200: FILE_REPLY})
async def images_generations(body: ImageRequest, request: Request):
    server = state(request)
    jobs = await server.blocking(queue_images, server, body)
    done = await wait_for_jobs(request, server, jobs)
    images = await run_in_threadpool(lambda: [encode(job, body) for job in done])
    if body.response_format == "file":
        return Response(images[0], media_type=f"image/{body.output_format}")
    seeds = [job.result["seed"] for job in done]
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=base64.b64encode(data).decode(), seed=s) for data, s in zip(images, seeds, strict=True)
        ],
        output_format=body.output_format,
        size=f"{done[0].result['width']}x{done[0].result['height']}",
        seed=seeds[0],
    )


def queue_images(server: ServerState, body: ImageRequest) -> list[Job]:
    settings, engine = server.settings, server.engine
    check_model(body.model, settings)
    if body.response_format == "file" and body.n > 1:
        raise APIError(400, "response_format='file' returns one image; use n=1 or b64_json", "response_format")
    extra = parse_extra(body.extra_params, body.extra_args)
    check_guardrails_request(engine, extra)
    check_sequence_length(engine, body.prompt, extra.pop("max_sequence_length", None))
    # The dialect's seed when none is sent (one rule per dialect: the table in generation/dialects.py); image i of
    # `n` uses seed + i, wrapped below 2**63 (the seed's range) as chat's choices are, so that every seed takes any n.
    seed = body.seed if body.seed is not None else defaults_for("vllm_omni", "text2image")["seed"]
    top = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "num_inference_steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        "flow_shift": body.flow_shift,
        "size": body.size,
    }
    fields, wire = merge_fields(top, extra, "vllm_omni")
    if fields.get("mode", "text2image") != "text2image":
        param = wire.get("mode", "mode")
        raise APIError(400, f"{param} does not apply to /v1/images/generations (text2image only)", param)
    fields["mode"] = "text2image"
    wire = {**VLLM_WIRE, **wire, "seed": "seed"}
    seeds = [(seed + i) % 2**63 if 0 <= seed < 2**63 else seed for i in range(body.n)]  # else: refused by name
    requests = [resolve(server, {**fields, "seed": s}, "vllm_omni", wire) for s in seeds]
    info = {"prompt": body.prompt, "image_format": "png"}  # encoded as asked when the reply is built
    return server.worker.submit_many([("images", r.__dict__, info, new_id("img")) for r in requests])


def encode(job: Job, body: ImageRequest) -> bytes:
    """The PNG the job wrote, or the same pixels as JPEG / WebP at `output_compression` quality."""
    data = read_output(job)
    if body.output_format == "png":
        return data
    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.convert("RGB").save(out, format=body.output_format.upper(), quality=body.output_compression)
        return out.getvalue()
