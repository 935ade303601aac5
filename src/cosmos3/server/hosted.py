"""The hosted dialect: `POST /predict` with `model_mode`, Framework field names, base64 media in the reply."""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from cosmos3.generation.dialects import ACTION_MODES
from cosmos3.server.app import check_limits
from cosmos3.server.inputs import fetch
from cosmos3.server.openai import finished, settings_of

router = APIRouter()

# The Framework's per-mode defaults (steps, guidance, shift); templates stay on, as there.
FRAMEWORK_DEFAULTS = {"text2image": (50, 4.0, 3.0), "video": (35, 6.0, 10.0), "action": (30, 1.0, 10.0)}

Mode = Literal[
    "text2image", "text2video", "image2video", "video2video", "forward_dynamics", "inverse_dynamics", "policy", "wam"
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_mode: Mode = "text2video"
    prompt: str = ""
    negative_prompt: str | None = None
    name: str | None = Field(None, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    resolution: str | int | None = None
    aspect_ratio: str | None = None
    num_frames: int | None = Field(None, ge=1, le=300)
    fps: float | None = Field(None, ge=1, le=120)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    vision_path: str | None = None
    action_path: str | None = None
    image_size: int | str | None = None
    num_steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, ge=0, le=20)
    shift: float | None = Field(None, gt=0, le=1000)
    action_chunk_size: int | None = Field(None, ge=1, le=1024)
    raw_action_dim: int | None = Field(None, ge=1, le=1024)
    domain_name: str | None = None
    view_point: str | None = None
    enable_sound: bool = False
    use_system_prompt: bool | None = None


@router.post("/predict")
async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
    settings, worker, engine = settings_of(request), request.app.state.worker, request.app.state.engine
    mode = "policy" if body.model_mode == "wam" else body.model_mode
    job_id = f"predict_{uuid.uuid4().hex}"
    folder = worker.job_dir(job_id) / "inputs"
    action = mode in ACTION_MODES
    steps, guidance, shift = FRAMEWORK_DEFAULTS[
        "text2image" if mode == "text2image" else "action" if action else "video"
    ]
    fields: dict[str, Any] = {
        "mode": mode,
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "seed": body.seed,
        "num_steps": body.num_steps or steps,
        "guidance": body.guidance if body.guidance is not None else guidance,
        "shift": body.shift or shift,
        "enable_sound": body.enable_sound,
        "use_system_prompt": body.use_system_prompt,
    }
    for name in (
        "num_frames",
        "fps",
        "aspect_ratio",
        "action_chunk_size",
        "raw_action_dim",
        "domain_name",
        "view_point",
    ):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    tier = body.image_size if action else body.resolution
    if tier is not None:
        fields["resolution"] = str(tier)
    elif action:
        fields["resolution"] = "256"  # the Framework's action default
    if mode == "text2image" and body.aspect_ratio is None:
        fields["aspect_ratio"] = "1,1"
    if body.vision_path:
        path, kind = fetch(body.vision_path, folder, "vision_path", settings)
        fields["video" if kind == "video" else "image"] = str(path)
        if mode == "text2video":  # the Framework infers the mode from vision_path when none is sent
            fields["mode"] = mode = "image2video" if kind == "image" else "video2video"
    if body.action_path:
        fields["action"] = str(fetch(body.action_path, folder, "action_path", settings)[0])
    resolved = engine.request(**fields)
    check_limits(resolved, settings)
    name = body.name or f"sample_{uuid.uuid4().hex[:8]}"
    job = worker.submit("predict", resolved.__dict__, {"prompt": body.prompt, "mode": mode, "name": name}, job_id)
    done = await finished(request, job)
    vision = done.outputs[0]
    with open(vision, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    reply: dict[str, Any] = {
        "name": name,
        "model_mode": body.model_mode,
        "format": "jpg" if vision.endswith(".jpg") else "mp4",
        "data": data,
    }
    if "action" in done.result:
        reply["sample_outputs"] = {
            "status": "success",
            "outputs": [
                {"content": {"action": done.result["action"]}, "files": [p.rsplit("/", 1)[-1] for p in done.outputs]}
            ],
        }
    return reply
