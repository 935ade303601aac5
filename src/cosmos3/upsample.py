"""Prompt upsampling: short prompts -> the structured JSON prompts Cosmos 3 was trained on.

Uses any OpenAI-compatible chat endpoint (through the `openai` client; seed 000's PROMPT_UPSAMPLER_* variables
name it), or the loaded checkpoint's own Reasoner (`--self`), with the documents' sampling defaults. The reply is
held to the structured-prompt JSON schema (`Upsampler.schema`): by constrained decoding with `--self`, and sent as
`response_format` to endpoints (one that refuses the field is asked without it). Every reply must still parse as a
JSON object with the cookbook's keys; an invalid one is retried with a new seed a bounded number of times, then
reported as an error.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import os
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
# Seed 000's names for the endpoint (the Framework's CLI reads PROMPT_UPSAMPLER_MODEL; the documents say _MODEL_NAME).
ENV = {
    "endpoint_url": "PROMPT_UPSAMPLER_ENDPOINT_URL",
    "model": "PROMPT_UPSAMPLER_MODEL_NAME",
    "api_token": "PROMPT_UPSAMPLER_API_TOKEN",
}
# Request fields an OpenAI-compatible endpoint may refuse (OpenAI itself takes no top_k); each is dropped, with a
# warning, after the endpoint answers 400 naming it.
OPTIONAL_FIELDS = ("response_format", "top_k", "repetition_penalty")

# The structured prompt's fields (the Framework's t2i / t2v_i2v JSON schemas, seed 003 and the API contracts 4.7).
# resolution, aspect_ratio, duration and fps are not asked for: `Upsampler.finish` writes the requested canvas.
SUBJECT_TEXT = (
    "description",
    "appearance_details",
    "relationship",
    "location",
    "relative_size",
    "orientation",
    "pose",
    "clothing",
    "expression",
    "gender",
    "age",
    "skin_tone_and_texture",
    "facial_features",
)
SUBJECT_COUNTS = ("number_of_subjects", "number_of_arms", "number_of_legs")
LIGHTING = ("conditions", "direction", "shadows", "illumination_effect")
AESTHETICS = ("composition", "color_scheme", "mood_atmosphere", "patterns")
CINEMATOGRAPHY = ("framing", "camera_angle", "depth_of_field", "focus", "lens_focal_length")
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right", "absolute_center")
SIGNAGE = ("text", "category", "appearance", "spatial", "context")

INSTRUCTION = """You expand a short description into a detailed, structured JSON prompt for a {what} generation model.
Reply with one JSON object and nothing else. Use only these top-level keys: {keys}.
"subjects" is a list of objects describing each subject ({subject_fields}).{extra}
Describe lighting, aesthetics and cinematography as objects of short phrases. Be concrete and visual; do not add
subjects the description does not imply.{image_note}

Description: {prompt}"""


@dataclass
class Upsampler:
    mode: str
    # (messages, seed=..., response_format=...) -> the reply's text; endpoint_completer and self_completer make one
    complete: Callable[..., str]
    resolution: str = "720"
    aspect_ratio: str = "16,9"
    fps: int = 24
    num_frames: int = 189
    # At most this many characters in each text field of the schema (its maxLength), e.g. to keep prompts within the
    # model's 512-token conditioning budget; None: unbounded.
    max_field_chars: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RequestError("mode", self.mode, ", ".join(MODES))
        if self.resolution not in RESOLUTIONS:
            raise RequestError("resolution", self.resolution, ", ".join(RESOLUTIONS))
        if self.aspect_ratio not in RESOLUTIONS[self.resolution]:
            raise RequestError("aspect_ratio", self.aspect_ratio, ", ".join(RESOLUTIONS[self.resolution]))
        if self.max_field_chars is not None and (
            isinstance(self.max_field_chars, bool)
            or not isinstance(self.max_field_chars, int)
            or self.max_field_chars < 1
        ):
            raise RequestError("max_field_chars", self.max_field_chars, "a positive integer or None")

    @property
    def keys(self) -> set[str]:
        return IMAGE_KEYS if self.mode == "text2image" else VIDEO_KEYS

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema of this mode's structured prompt: the cookbook keys and their shapes, a non-empty
        `subjects` list, the background and the caption required, nothing else allowed."""
        video = self.mode != "text2image"
        subject = texts(SUBJECT_TEXT + (("action", "state_changes") if video else ()), required=["description"])
        counts = SUBJECT_COUNTS + (() if video else ("number_of_hands", "number_of_fingers"))
        subject["properties"].update({k: {"type": "integer", "minimum": 0} for k in counts})
        signage = texts(SIGNAGE + (("spatial_temporal",) if video else ()))
        properties: dict[str, Any] = {
            "subjects": {"type": "array", "items": subject, "minItems": 1},
            "subject_details": {  # snake_case names of free text, as the cookbook prompts have them
                "type": "object",
                "patternProperties": {f"^[a-z][a-z0-9_]{{0,{(self.max_field_chars or 64) - 1}}}$": {"type": "string"}},
                "additionalProperties": False,
            },
            "background_setting": {"type": "string"},
            "lighting": texts(LIGHTING),
            "aesthetics": texts(AESTHETICS),
            "cinematography": texts((("camera_motion",) if video else ()) + CINEMATOGRAPHY),
            "style_medium": {"type": "string"},
            "artistic_style": {"type": "string"},
            "context": {"type": "string"},
            "text_and_signage_elements": {"type": "array", "items": signage},
        }
        if video:
            segment = texts(("time_range", "description", "key_changes", "camera"))
            segment["properties"]["segment_index"] = {"type": "integer", "minimum": 0}
            properties |= {
                "actions": {"type": "array", "items": texts(("time", "description"), required=["time", "description"])},
                "segments": {"type": "array", "items": segment},
                "transitions": {"type": "array", "items": {"type": "string"}},
                "temporal_caption": {"type": "string"},
                "audio_description": {"type": "string"},
            }
            properties["actions"]["items"]["properties"]["time"]["pattern"] = r"^[0-9]+:[0-5][0-9]-[0-9]+:[0-5][0-9]$"
            caption = "temporal_caption"
        else:
            properties |= {"quadrant_scan": texts(QUADRANTS), "comprehensive_t2i_caption": {"type": "string"}}
            caption = "comprehensive_t2i_caption"
        assert set(properties) <= self.keys
        schema = {
            "type": "object",
            "properties": properties,
            "required": ["subjects", "background_setting", caption],
            "additionalProperties": False,
        }
        if self.max_field_chars is not None:
            bound_strings(schema, self.max_field_chars)
        return schema

    @property
    def response_format(self) -> dict[str, Any]:
        return {
            "type": "json_schema",
            "json_schema": {"name": f"cosmos3_{self.mode}_prompt", "schema": self.schema, "strict": True},
        }

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
            # Each attempt a new seed: the documents' 3407 first, then 3408, ... (a retry must not repeat itself).
            seed = SAMPLING["seed"] + attempt - 1
            obj = self.parse(self.complete(messages, seed=seed, response_format=self.response_format))
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


def texts(names: tuple[str, ...], required: list[str] | None = None) -> dict[str, Any]:
    """An object schema of short text fields (all optional unless `required`)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: {"type": "string"} for name in names},
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def bound_strings(schema: Any, chars: int) -> None:
    """Give every free-text string of a schema a maxLength (patterned strings keep their pattern)."""
    if isinstance(schema, dict):
        if schema.get("type") == "string" and "pattern" not in schema:
            schema["maxLength"] = chars
        for value in schema.values():
            bound_strings(value, chars)


def endpoint_completer(
    endpoint_url: str | None = None, model: str | None = None, api_token: str | None = None, timeout_s: float = 600.0
):
    """Chat completions from an OpenAI-compatible endpoint through the `openai` client, with the documents' sampling
    defaults; unset arguments come from the PROMPT_UPSAMPLER_* variables (`ENV`)."""
    from openai import APIConnectionError, APIStatusError, BadRequestError, OpenAI

    endpoint_url = endpoint_url or os.environ.get(ENV["endpoint_url"])
    model = model or os.environ.get(ENV["model"])
    api_token = api_token or os.environ.get(ENV["api_token"])
    for field, value in (("endpoint_url", endpoint_url), ("model", model)):
        if not value:
            raise RequestError(field, None, f"a value (or the {ENV[field]} variable)", "is missing")
    base_url = endpoint_url.rstrip("/").removesuffix("/chat/completions")
    client = OpenAI(base_url=base_url, api_key=api_token or "EMPTY", timeout=timeout_s, max_retries=2)
    refused: set[str] = set()  # optional fields this endpoint answered 400 to

    def complete(messages: list[dict], seed: int = SAMPLING["seed"], response_format: dict | None = None) -> str:
        while True:
            body: dict[str, Any] = {k: v for k, v in SAMPLING.items() if k not in ("top_k", "repetition_penalty")}
            extra = {k: SAMPLING[k] for k in ("top_k", "repetition_penalty") if k not in refused}  # vLLM's fields
            if response_format is not None and "response_format" not in refused:
                body["response_format"] = response_format
            try:
                reply = client.chat.completions.create(
                    model=model, messages=messages, **{**body, "seed": seed}, extra_body=extra
                )
            except BadRequestError as exc:
                named = [f for f in OPTIONAL_FIELDS if f not in refused and f in str(exc) and (f in body or f in extra)]
                if not named:
                    raise RequestError(
                        "endpoint_url", endpoint_url, "an endpoint that accepts the request", f"answered {exc}"
                    ) from exc
                logger.warning("%s refuses %s: asking without it", endpoint_url, named[0])
                refused.add(named[0])
                continue
            except APIStatusError as exc:
                raise RequestError(
                    "endpoint_url",
                    endpoint_url,
                    "an endpoint that answers 200",
                    f"answered {exc.status_code}: {str(exc)[:200]}",
                ) from exc
            except APIConnectionError as exc:
                raise RequestError(
                    "endpoint_url", endpoint_url, "a reachable OpenAI-compatible endpoint", f"failed ({exc})"
                ) from exc
            return (reply.choices[0].message.content or "") if reply.choices else ""

    return complete


def self_completer(engine, max_tokens: int | None = None):
    """Chat completions from the loaded checkpoint's own Reasoner (no service, no key), held to the schema by
    constrained decoding."""
    sampling = {**SAMPLING, "max_tokens": max_tokens or SAMPLING["max_tokens"]}

    def complete(messages: list[dict], seed: int = SAMPLING["seed"], response_format: dict | None = None) -> str:
        return engine.reason(messages, **{**sampling, "seed": seed}, response_format=response_format)

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
