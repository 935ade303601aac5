"""Prompt text the model was trained on: system prompts, metadata sentences, the action JSON caption, tokenization."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

# "a give prompt" is verbatim: it is the text the model was trained with.
SYSTEM_PROMPT_IMAGE = "You are a helpful assistant who will generate images from a give prompt."
SYSTEM_PROMPT_VIDEO = "You are a helpful assistant who will generate videos from a give prompt."

DURATION = "The video is {duration:.1f} seconds long and is of {fps:.0f} FPS."
IMAGE_RESOLUTION = "This image is of {height}x{width} resolution."
VIDEO_RESOLUTION = "This video is of {height}x{width} resolution."
INVERSE_DURATION = "The video is not {duration:.1f} seconds long and is not of {fps:.0f} FPS."
INVERSE_IMAGE_RESOLUTION = "This image is not of {height}x{width} resolution."
INVERSE_VIDEO_RESOLUTION = "This video is not of {height}x{width} resolution."

VIEW_POINT_FRAMING = {
    "ego_view": "This video is captured from a first-person perspective looking at the scene.",
    "third_person_view": (
        "This video is captured from a third-person perspective looking towards the agent from the front."
    ),
    "wrist_view": "This video is captured from a wrist-mounted camera.",
    "concat_view": "This video contains concatenated views from multiple camera perspectives.",
}

VISION_START = "<|vision_start|>"


def _append(base: str, sentence: str) -> str:
    base = base.rstrip(".")
    return f"{base}. {sentence}" if base else sentence


def with_metadata(
    text: str,
    *,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    negative: bool,
    duration_template: bool = True,
    resolution_template: bool = True,
) -> str:
    """Append the duration (video only) and resolution sentences; negative prompts get the "is not" forms."""
    is_image = num_frames == 1
    if not is_image and duration_template:
        template = INVERSE_DURATION if negative else DURATION
        text = _append(text, template.format(duration=num_frames / fps, fps=fps))
    if resolution_template:
        if is_image:
            template = INVERSE_IMAGE_RESOLUTION if negative else IMAGE_RESOLUTION
        else:
            template = INVERSE_VIDEO_RESOLUTION if negative else VIDEO_RESOLUTION
        text = _append(text, template.format(height=height, width=width))
    return text


def action_caption(
    description: str, *, view_point: str | None, num_frames: int, fps: float, height: int, width: int
) -> str:
    """The structured JSON caption action checkpoints were trained on (key order and formatting matter)."""
    seconds = num_frames / fps if fps > 0 else 0.0
    finite = seconds >= 0 and math.isfinite(seconds)
    duration = int(seconds) if finite else 0
    minutes, secs = divmod(round(seconds) if finite else 0, 60)
    desc = description.strip()
    if desc and not desc.endswith((".", "!", "?")):
        desc += "."
    caption: dict[str, Any] = {}
    framing = VIEW_POINT_FRAMING.get(view_point) if view_point is not None else None
    if view_point is not None and framing is None:
        logger.warning(
            "view_point=%r is unknown (known: %s); the framing sentence is left out",
            view_point,
            sorted(VIEW_POINT_FRAMING),
        )
    if framing:
        caption["cinematography"] = {"framing": framing}
    ratio = width / height if height > 0 else 1.0
    aspect = min(
        ("1,1", "4,3", "3,4", "16,9", "9,16"),
        key=lambda r: abs(int(r[: r.index(",")]) / int(r[r.index(",") + 1 :]) - ratio),
    )
    caption["actions"] = [{"time": f"0:00-{minutes}:{secs:02d}", "description": desc}]
    caption["duration"] = f"{duration}s"
    caption["fps"] = float(fps)
    caption["resolution"] = {"H": int(height), "W": int(width)}
    caption["aspect_ratio"] = aspect
    return json.dumps(caption)


def generation_input_ids(tokenizer: Any, text: str, system_prompt: str | None) -> list[int]:
    """Chat-template the user text, then append eos and `<|vision_start|>`, which opens the generated media."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, add_vision_id=False, return_dict=True
    )
    return list(encoded["input_ids"]) + [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(VISION_START)]
