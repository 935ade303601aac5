"""Prompt upsampling: short prompts -> the structured JSON prompts Cosmos 3 was trained on.

Uses any OpenAI-compatible chat endpoint, or the loaded checkpoint's own Reasoner (`--self`), with the documents'
sampling defaults. Every reply must be a JSON object with the cookbook's keys; invalid replies are retried a
bounded number of times and then reported as an error.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmos3.errors import RequestError
from cosmos3.generation.request import RESOLUTIONS

logger = logging.getLogger(__name__)

# The documents' "Generator prompt upsampling" sampling defaults.
SAMPLING = {
    "max_tokens": 20000,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.0,
    "presence_penalty": 1.5,
    "seed": 3407,
}
MAX_ATTEMPTS = 3
CONDITIONING_TOKEN_LIMIT = 512  # the model's text conditioning budget

COMMON_KEYS = {
    "subjects",
    "subject_details",
    "background_setting",
    "lighting",
    "aesthetics",
    "cinematography",
    "style_medium",
    "artistic_style",
    "context",
    "text_and_signage_elements",
    "resolution",
    "aspect_ratio",
}
IMAGE_KEYS = COMMON_KEYS | {"quadrant_scan", "comprehensive_t2i_caption"}
VIDEO_KEYS = COMMON_KEYS | {
    "actions",
    "segments",
    "transitions",
    "temporal_caption",
    "audio_description",
    "duration",
    "fps",
}
MODES = ("text2image", "text2video", "image2video")

INSTRUCTION = """You expand a short description into a detailed, structured JSON prompt for a {what} generation model.
Reply with one JSON object and nothing else. Use only these top-level keys: {keys}.
"subjects" is a list of objects describing each subject ({subject_fields}).{extra}
Describe lighting, aesthetics and cinematography as objects of short phrases. Be concrete and visual; do not add
subjects the description does not imply.{image_note}

Description: {prompt}"""


@dataclass
class Upsampler:
    mode: str
    complete: Callable[[list[dict]], str]  # chat messages -> reply text
    resolution: str = "720"
    aspect_ratio: str = "16,9"
    fps: int = 24
    num_frames: int = 189

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RequestError("mode", self.mode, ", ".join(MODES))
        if self.resolution not in RESOLUTIONS:
            raise RequestError("resolution", self.resolution, ", ".join(RESOLUTIONS))
        if self.aspect_ratio not in RESOLUTIONS[self.resolution]:
            raise RequestError("aspect_ratio", self.aspect_ratio, ", ".join(RESOLUTIONS[self.resolution]))

    @property
    def keys(self) -> set[str]:
        return IMAGE_KEYS if self.mode == "text2image" else VIDEO_KEYS

    def messages(self, prompt: str, image_url: str | None) -> list[dict]:
        video = self.mode != "text2image"
        text = INSTRUCTION.format(
            what="video" if video else "image",
            keys=", ".join(sorted(self.keys)),
            subject_fields="description, appearance_details, location, relative_size, orientation, pose"
            + (", action, state_changes" if video else ""),
            extra=' "actions" is a list of {"time": "M:SS-M:SS", "description": ...}; "temporal_caption" tells '
            "what happens over time."
            if video
            else ' "comprehensive_t2i_caption" is one detailed paragraph.',
            image_note="\nThe attached image is the first frame: describe it faithfully and continue from it."
            if image_url
            else "",
            prompt=prompt,
        )
        content: list[dict] = [{"type": "text", "text": text}]
        if image_url:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
        return [{"role": "user", "content": content}]

    def parse(self, reply: str) -> dict[str, Any] | None:
        """The JSON object of a reply (code fences allowed), or None when it is not a valid structured prompt."""
        text = reply.strip()
        if text.startswith("```"):
            text = text.strip("`").split("\n", 1)[-1] if "\n" in text else ""
            text = text.rsplit("```", 1)[0]
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            obj = json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("subjects"), list):
            return None
        if set(obj) - self.keys or len(set(obj) & self.keys) < 3:
            return None
        return obj

    def finish(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Overwrite the output geometry with the requested canvas, as the Framework does."""
        width, height = RESOLUTIONS[self.resolution][self.aspect_ratio]
        obj["resolution"] = {"H": height, "W": width}
        obj["aspect_ratio"] = self.aspect_ratio
        if self.mode == "text2image":
            obj.pop("duration", None)
            obj.pop("fps", None)
        else:
            obj["duration"] = f"{int(self.num_frames / self.fps)}s"
            obj["fps"] = float(self.fps)
        return obj

    def upsample(self, prompt: str, image_url: str | None = None) -> dict[str, Any]:
        if self.mode == "image2video" and not image_url:
            raise RequestError("image_url", None, "an image URL or path for each image2video prompt", "is missing")
        messages = self.messages(prompt, image_url)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            obj = self.parse(self.complete(messages))
            if obj is not None:
                return self.finish(obj)
            logger.warning(
                "upsampling %r: reply %d of %d is not a valid structured prompt", prompt[:40], attempt, MAX_ATTEMPTS
            )
        raise RequestError(
            "prompt",
            prompt,
            f"a prompt the upsampler turns into the structured JSON keys ({', '.join(sorted(self.keys))})",
            f"got no valid JSON in {MAX_ATTEMPTS} attempts",
        )


def endpoint_completer(endpoint_url: str, model: str, api_token: str | None, timeout_s: float = 600.0):
    """Chat completions from an OpenAI-compatible endpoint, with the documents' sampling defaults."""
    import httpx

    url = endpoint_url.rstrip("/") + (
        "/chat/completions" if not endpoint_url.rstrip("/").endswith("/chat/completions") else ""
    )
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}

    def complete(messages: list[dict]) -> str:
        body = {"model": model, "messages": messages, **SAMPLING}
        try:
            resp = httpx.post(url, json=body, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise RequestError(
                "endpoint_url", endpoint_url, "a reachable OpenAI-compatible endpoint", f"failed ({exc})"
            ) from exc
        if resp.status_code != 200:
            raise RequestError(
                "endpoint_url",
                endpoint_url,
                "an endpoint that answers 200",
                f"answered {resp.status_code}: {resp.text[:200]}",
            )
        return resp.json()["choices"][0]["message"]["content"] or ""

    return complete


def self_completer(engine, max_tokens: int | None = None):
    """Chat completions from the loaded checkpoint's own Reasoner (no service, no key)."""
    sampling = {**SAMPLING, "max_tokens": max_tokens or SAMPLING["max_tokens"]}

    def complete(messages: list[dict]) -> str:
        return engine.reason(messages, **sampling)

    return complete


def as_image_url(value: str) -> str:
    """URLs pass through; local files become data URIs (so that remote endpoints can see them)."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value)
    if not path.is_file():
        raise RequestError("image_url", value, "an http(s) URL, a data URI or an existing image file", "does not exist")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def count_tokens(tokenizer, obj: dict[str, Any]) -> int:
    return len(tokenizer(json.dumps(obj, separators=(",", ":")), add_special_tokens=False)["input_ids"])
