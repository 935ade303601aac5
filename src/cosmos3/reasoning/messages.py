"""OpenAI / Qwen3-VL chat messages -> chat-template messages plus the decoded images and videos, within limits.

Every image and video of a request is fetched and decoded here, so the limits below bound what one chat request
can make the server hold: each is checked before the work it guards where the media header allows it (image
size, video length and frame size), and during decoding otherwise. A request past a limit is a `RequestError`
naming the field and what is allowed.
"""

from __future__ import annotations

import io
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cosmos3.errors import RequestError

# The documents' explicit-reasoning instruction, appended to the last user message when `reasoning=True`.
REASONING_SUFFIX = (
    "Answer the question using the following format:\n<think>\nYour reasoning.\n</think>\n\n"
    "Write your final answer immediately after the </think> tag."
)
ROLES = ("system", "user", "assistant")

MAX_MEDIA_BYTES = 256 * 2**20  # one encoded image or video (a data: URI, a local file, a download)
MAX_IMAGE_PIXELS = 64_000_000  # one image, checked from its header before decoding
MAX_FRAME_PIXELS = 3840 * 2160  # one video frame (4K UHD)
MAX_VIDEO_FRAMES = 4096  # decoded frames of one video, before sampling
MAX_VIDEO_SECONDS = 600.0  # one video's duration
MAX_VIDEO_FPS = 1000.0  # the frame rate a pre-decoded frame list may state
# Decoded pixels over all images and video frames of one request, frames that `num_frames` repeats included
# (about 1.5 GiB as RGB): what bounds the request's memory, however the media is split.
MAX_REQUEST_PIXELS = 2**29
# The most frames a request may ask the processor to sample: the Qwen3-VL video processor's max_frames, which its
# own fps sampling never exceeds (an explicit num_frames is not capped by it).
MAX_SAMPLED_FRAMES = 768
MAX_SAMPLING_FPS = 60.0  # requested sampling rate (frames per second of video)
# Qwen3-VL's temporal_patch_size: its processor refuses a video that has, or is sampled to, fewer frames ("t:1 must
# be larger than temporal_factor:2"); a single frame goes as an image.
MIN_VIDEO_FRAMES = 2

Fetch = Callable[[str, str], bytes]  # (url, field) -> bytes; local-path rules are the caller's


def video_sampling(fps: Any, num_frames: Any) -> dict[str, Any]:
    """The processor's frame-sampling arguments for a request's video `fps` or `num_frames` (at most one)."""
    if fps is not None and num_frames is not None:
        raise RequestError("media_io_kwargs.video", {"fps": fps, "num_frames": num_frames}, "either fps or num_frames")
    if num_frames is not None:
        integer = isinstance(num_frames, numbers.Integral) and not isinstance(num_frames, bool)
        if not integer or not MIN_VIDEO_FRAMES <= num_frames <= MAX_SAMPLED_FRAMES:
            raise RequestError(
                "media_io_kwargs.video.num_frames",
                num_frames,
                f"an integer from {MIN_VIDEO_FRAMES} (a temporal patch) to {MAX_SAMPLED_FRAMES} (the Qwen3-VL "
                "processor's max_frames)",
            )
        return {"num_frames": int(num_frames), "fps": None}  # fps=None: the processor's default fps would conflict
    if fps is not None:
        if not positive_number(fps, MAX_SAMPLING_FPS):
            raise RequestError("media_io_kwargs.video.fps", fps, f"a number above 0 and up to {MAX_SAMPLING_FPS:g}")
        return {"fps": float(fps)}
    return {}


def positive_number(value: Any, most: float) -> bool:
    """True for a finite int or float in (0, most]; bools and strings are not numbers here."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return ok and math.isfinite(value) and 0 < value <= most


def asks_for_reasoning(messages: Any) -> bool:
    """True when the last user turn asks for the documents' explicit-reasoning format (the <think> tags): such a
    request gets the with-reasoning sampling settings, as the documents pair them."""
    if not isinstance(messages, list):
        return False
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return False
    content = users[-1].get("content")
    parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
    texts = [p if isinstance(p, str) else p.get("text") for p in parts if isinstance(p, (str, dict))]
    return any(isinstance(t, str) and "</think>" in t for t in texts)


def template_messages(messages: Any, reasoning: bool, media: MediaReader | None) -> tuple[list[dict], list, list]:
    """Validate OpenAI / Qwen3-VL messages; returns (chat-template messages, images, videos) in order.

    `media` is None for a checkpoint without a vision tower: then any image or video part is refused before it is
    fetched."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", messages, "a non-empty list of {role, content} messages")
    out, images, videos = [], [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise RequestError(
                f"messages[{i}].role", msg.get("role") if isinstance(msg, dict) else msg, ", ".join(ROLES)
            )
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content", content, "a string or a list of content parts")
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{where}.text", part.get("text"), "a string")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image", "video_url", "video"):
                if media is None:
                    raise RequestError(
                        where,
                        "<image or video part>",
                        "text-only messages for this checkpoint",
                        "needs a vision tower, and this checkpoint has none (no blocks.*/merger.* weights or "
                        "no vision_config in config.json)",
                    )
                if kind in ("image_url", "image"):
                    images.append(media.image(part, kind, where))
                    parts.append({"type": "image"})
                else:
                    videos.append(media.video(part, kind, where))
                    parts.append({"type": "video"})
            else:
                raise RequestError(f"{where}.type", kind, "text, image_url, video_url, image, video")
        out.append({"role": msg["role"], "content": parts})
    if out[-1]["role"] == "assistant":
        raise RequestError("messages[-1].role", "assistant", "a user or system message last when a reply is asked for")
    if reasoning:
        last_user = max(i for i, m in enumerate(out) if m["role"] != "assistant")
        out[last_user]["content"].append({"type": "text", "text": "\n" + REASONING_SUFFIX})
    return out, images, videos


class MediaReader:
    """Fetches and decodes the images and videos of one request, within the limits above.

    `num_frames` is the request's explicit frame count, if any: the processor repeats frames of a shorter video to
    reach it, and those repeats count against the request's pixels too."""

    def __init__(self, fetch: Fetch, num_frames: int | None = None):
        self.fetch = fetch
        self.num_frames = num_frames
        self.pixels_left = MAX_REQUEST_PIXELS

    def image(self, part: dict, kind: str, where: str) -> Image.Image:
        value = media_value(part, kind, where)
        if isinstance(value, np.ndarray):
            try:
                value = Image.fromarray(value)
            except (TypeError, ValueError) as exc:
                raise RequestError(
                    where, f"array of shape {list(value.shape)} and dtype {value.dtype}", "an [H, W, 3] uint8 array"
                ) from exc
        if isinstance(value, Image.Image):
            check_image_size(value, where)
            self.take(value.width * value.height, where, f"{value.width}x{value.height}")
            return as_rgb(value)
        return self.decode_image(self.read(value, where), where)

    def video(self, part: dict, kind: str, where: str) -> tuple[np.ndarray, float | None]:
        value = media_value(part, kind, where)
        if isinstance(value, (list, tuple, np.ndarray)):
            frames, fps = self.frames(value, part.get("fps"), where)
        else:
            frames, fps = self.decode_video(self.read(value, where), where)
        if self.num_frames is not None and self.num_frames > len(frames):
            t, h, w, _ = frames.shape
            self.take((self.num_frames - t) * h * w, "media_io_kwargs.video.num_frames", self.num_frames)
        return frames, fps

    def take(self, pixels: int, field: str, value: Any) -> None:
        """Count decoded pixels against the request's budget, refusing the media that goes past it."""
        if pixels > self.pixels_left:
            raise RequestError(
                field,
                value,
                f"at most {MAX_REQUEST_PIXELS:,} decoded pixels over all images and video frames of a request",
                "is too large",
            )
        self.pixels_left -= pixels

    def read(self, url: Any, where: str) -> bytes:
        if not isinstance(url, str):
            raise RequestError(where, url, "a URL or data URI string, an image, or a list of frames")
        if len(url) > MAX_MEDIA_BYTES * 4 // 3 + 1024:  # base64 of the largest medium, and its header
            raise RequestError(where, url, f"media up to {MAX_MEDIA_BYTES:,} bytes", "is too large")
        data = self.fetch(url, where)
        if len(data) > MAX_MEDIA_BYTES:
            raise RequestError(where, f"{len(data):,} bytes", f"media up to {MAX_MEDIA_BYTES:,} bytes", "is too large")
        return data

    def decode_image(self, data: bytes, where: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))  # reads the header: the size is known before decoding
        except Exception as exc:
            raise RequestError(where, "<image bytes>", "a JPEG/PNG/WebP image", cannot_decode(exc)) from exc
        check_image_size(image, where)
        self.take(image.width * image.height, where, f"{image.width}x{image.height}")
        try:
            image.load()
        except Exception as exc:
            raise RequestError(where, "<image bytes>", "a JPEG/PNG/WebP image", cannot_decode(exc)) from exc
        return as_rgb(image)

    def frames(self, value: Any, fps: Any, where: str) -> tuple[np.ndarray, float | None]:
        """Pre-decoded frames (Python callers): `[T, H, W, 3]` uint8, with an optional `fps` beside the URL."""
        allowed = (
            f"[T, H, W, 3] uint8 frames, {MIN_VIDEO_FRAMES} <= T <= {MAX_VIDEO_FRAMES}, H * W <= {MAX_FRAME_PIXELS:,}"
        )
        count = len(value) if not isinstance(value, np.ndarray) or value.ndim == 4 else 0
        if not MIN_VIDEO_FRAMES <= count <= MAX_VIDEO_FRAMES:
            raise RequestError(where, f"{count} frames" if count else "<frames>", allowed)
        try:
            frames = np.stack([np.asarray(f) for f in value])
        except (TypeError, ValueError) as exc:
            raise RequestError(where, "<frames>", allowed, f"cannot be stacked ({exc})") from exc
        shape = list(frames.shape)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise RequestError(where, f"frames of shape {shape} and dtype {frames.dtype}", allowed)
        if shape[1] * shape[2] > MAX_FRAME_PIXELS:
            raise RequestError(where, f"frames of shape {shape}", allowed, "is too large")
        if fps is not None and not positive_number(fps, MAX_VIDEO_FPS):
            raise RequestError(f"{where}.fps", fps, f"a number above 0 and up to {MAX_VIDEO_FPS:g}")
        self.take(shape[0] * shape[1] * shape[2], where, f"frames of shape {shape}")
        return frames, None if fps is None else float(fps)

    def decode_video(self, data: bytes, where: str) -> tuple[np.ndarray, float | None]:
        import av

        frames = []
        try:
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else None
                check_video_header(container, stream, where)
                for frame in container.decode(stream):
                    check_video_frame(frame, len(frames), where)
                    shown = f"{len(frames) + 1} frames of {frame.width}x{frame.height}"
                    self.take(frame.width * frame.height, where, shown)
                    frames.append(frame.to_ndarray(format="rgb24"))
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(where, "<video bytes>", "an MP4/WebM/MOV video", cannot_decode(exc)) from exc
        return np.stack(check_frame_count(frames, where)), fps


def cannot_decode(exc: Exception) -> str:
    """Why a medium was refused: the decoder's message without the object reprs some put in it (PIL: "cannot
    identify image file <_io.BytesIO object at 0x7f...>"), which tell a client nothing."""
    reason = re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(exc)) or type(exc).__name__
    return f"cannot be decoded ({reason})"


def check_frame_count(frames: list, where: str) -> list:
    if len(frames) < MIN_VIDEO_FRAMES:
        raise RequestError(
            where,
            f"a video of {len(frames)} frame{'s' if len(frames) != 1 else ''}",
            f"a video of at least {MIN_VIDEO_FRAMES} frames (Qwen3-VL's temporal patch); send one frame as an image",
        )
    return frames


def media_value(part: dict, kind: str, where: str) -> Any:
    """The part's medium: `{kind: url}` or `{kind: {url: ...}}`, the url possibly an in-memory image or frames."""
    value = part.get(kind)
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        raise RequestError(f"{where}.{kind}", value, "a URL string or {url: ...}", "is missing")
    return value


def as_rgb(image: Image.Image) -> Image.Image:
    """An image as the model sees it, as transformers and vLLM read images: upright by its EXIF orientation (phone
    photos are stored sideways), and any transparency composited on white (the Qwen3-VL image processor's
    `convert_to_rgb`), not dropped."""
    image = ImageOps.exif_transpose(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def check_image_size(image: Image.Image, where: str) -> None:
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise RequestError(
            where, f"{image.width}x{image.height}", f"images up to {MAX_IMAGE_PIXELS:,} pixels", "is too large"
        )


def check_video_header(container: Any, stream: Any, where: str) -> None:
    """Refuse, before decoding, a video whose header states too long a duration, too many or too large frames."""
    durations = []
    if container.duration:
        durations.append(container.duration / 1_000_000)  # microseconds (av.time_base)
    if stream.duration and stream.time_base:
        durations.append(float(stream.duration * stream.time_base))
    if durations and max(durations) > MAX_VIDEO_SECONDS:
        raise RequestError(
            where, f"{max(durations):.1f} s", f"videos up to {MAX_VIDEO_SECONDS:g} seconds", "is too long"
        )
    if stream.frames > MAX_VIDEO_FRAMES:
        raise RequestError(
            where, f"{stream.frames} frames", f"videos up to {MAX_VIDEO_FRAMES} frames", "has too many frames"
        )
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > MAX_FRAME_PIXELS:
        raise RequestError(where, f"{width}x{height}", f"frames up to {MAX_FRAME_PIXELS:,} pixels", "is too large")


def check_video_frame(frame: Any, decoded: int, where: str) -> None:
    """The header can understate: check each decoded frame's count, size and time as well."""
    if decoded >= MAX_VIDEO_FRAMES:
        raise RequestError(where, "<video>", f"videos up to {MAX_VIDEO_FRAMES} frames", "has too many frames")
    if frame.width * frame.height > MAX_FRAME_PIXELS:
        raise RequestError(
            where, f"{frame.width}x{frame.height}", f"frames up to {MAX_FRAME_PIXELS:,} pixels", "is too large"
        )
    if frame.time is not None and frame.time > MAX_VIDEO_SECONDS:
        raise RequestError(where, f"{frame.time:.1f}+ s", f"videos up to {MAX_VIDEO_SECONDS:g} seconds", "is too long")
