"""Image, video and audio in and out (PIL and PyAV)."""

from __future__ import annotations

import base64
import urllib.request
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cosmos3.errors import RequestError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
MAX_FETCH_BYTES = 512 * 2**20
FETCH_TIMEOUT_S = 20.0


def fetch_bytes(url: str, field: str, allowed_dir: Path | None = None, allow_local: bool = True) -> bytes:
    """http(s) (bounded time and size), `data:` base64 URIs, `file://` and plain local paths.

    Local paths must resolve (after `..` and symlinks) under `allowed_dir` when it is given; with
    `allow_local=False` (a server started without an allowed media folder) they are refused."""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=False)
        except (IndexError, ValueError) as exc:
            raise RequestError(field, url[:40], "a base64 data URI (data:<mime>;base64,...)", "is malformed") from exc
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:
                data = resp.read(MAX_FETCH_BYTES + 1)
        except Exception as exc:
            raise RequestError(
                field, url, f"a URL reachable within {FETCH_TIMEOUT_S:.0f} s", f"is unreachable ({exc})"
            ) from exc
        if len(data) > MAX_FETCH_BYTES:
            raise RequestError(field, url, f"media up to {MAX_FETCH_BYTES // 2**20} MiB", "is too large")
        return data
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    if not allow_local:
        raise RequestError(
            field, url, "an http(s) URL or a data URI (this server reads no local files)", "is a local path"
        )
    if allowed_dir is not None:
        resolved = path.resolve()
        if not resolved.is_relative_to(allowed_dir.resolve()):
            raise RequestError(field, url, f"a file under {allowed_dir}", "is outside the allowed media folder")
    if not path.is_file():
        raise RequestError(field, url, "an http(s) URL, a data URI or an existing local file", "does not exist")
    return path.read_bytes()


def image_values(frame: Any, field: str) -> torch.Tensor:
    """An in-memory image -> float32 `[3, H, W]` in 0..255, read as the reference reads it: PIL and integer arrays
    as 0..255; float arrays in [-1, 1] (any negative value), [0, 1] (max <= 1) or 0..255. numpy is HWC, torch CHW."""
    if isinstance(frame, Image.Image):
        return torch.from_numpy(np.array(frame.convert("RGB"), copy=True)).permute(2, 0, 1).float()
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1) if frame.ndim == 3 else None
    if not isinstance(frame, torch.Tensor) or frame.ndim != 3 or frame.shape[0] != 3:
        raise RequestError(
            field,
            getattr(frame, "shape", type(frame).__name__),
            "a path, a PIL image, an HxWx3 numpy array or a 3xHxW torch tensor",
        )
    values = frame.detach().cpu().float()
    if frame.is_floating_point():
        if values.min() < 0:
            values = (values + 1.0) * 127.5
        elif values.max() <= 1.0:
            values = values * 255.0
    return values


def to_pil(frame: Any, field: str) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    values = image_values(frame, field).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).numpy())


def load_image(source: Any, field: str = "image") -> Image.Image | torch.Tensor:
    """A path (image file, or a video's first frame) or a PIL image -> RGB PIL image; an array or tensor ->
    `image_values` (kept in float so that float inputs are resized without rounding first, as the reference does)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RequestError(field, str(source), "a readable image or video file", "does not exist")
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return load_video(path, field)[0][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except Exception as exc:  # PIL raises several types for corrupt files
            raise RequestError(field, str(source), "a readable JPEG/PNG/WebP image", f"cannot be read ({exc})") from exc
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    return image_values(source, field)


def load_video(source: Any, field: str = "video") -> tuple[list[Image.Image], float | None]:
    """A path, a list of frames or a [T, H, W, 3] array -> (RGB PIL frames, fps or None)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RequestError(field, str(source), "a readable video file", "does not exist")
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            return [load_image(path, field)], None
        import av  # imported on use: the model code runs without PyAV (e.g. on benchmark machines)

        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else None
                frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
        except Exception as exc:
            raise RequestError(
                field, str(source), "a readable MP4/MOV/MKV/WebM video", f"cannot be read ({exc})"
            ) from exc
        if not frames:
            raise RequestError(field, str(source), "a video with at least one frame", "has no frames")
        return frames, fps
    if isinstance(source, (np.ndarray, torch.Tensor)) and source.ndim == 4:
        return [to_pil(f, field) for f in source], None
    if isinstance(source, (list, tuple)) and source:
        return [to_pil(f, field) for f in source], None
    raise RequestError(field, type(source).__name__, "a path, a non-empty list of frames or a [T,H,W,3] array")


def write_image(path: str | Path, frame: np.ndarray) -> None:
    """JPEG (quality 95) or PNG by suffix, from uint8 `[H, W, 3]`."""
    options = {"quality": 95} if str(path).lower().endswith((".jpg", ".jpeg")) else {}
    Image.fromarray(frame).save(path, **options)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    sound: np.ndarray | None = None,
    sample_rate: int | None = None,
) -> None:
    """H.264 MP4 at `fps` from uint8 `[T, H, W, 3]`; with `sound` `[channels, samples]` an AAC track is muxed."""
    import av

    t, h, w, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w - w % 2, h - h % 2  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "17", "preset": "medium"}
        audio = None
        if sound is not None:
            layout = "stereo" if sound.shape[0] == 2 else "mono"
            audio = container.add_stream("aac", rate=sample_rate, layout=layout)
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]))
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            # The audio decoder emits whole hops (up to one hop past the video); the file keeps the video's length.
            samples = np.ascontiguousarray(sound[:, : round(t / fps * sample_rate)].astype(np.float32))
            chunk = 1024
            for start in range(0, samples.shape[1], chunk):
                piece = np.ascontiguousarray(samples[:, start : start + chunk])
                audio_frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=audio.layout.name)
                audio_frame.sample_rate = sample_rate
                audio_frame.pts = start
                for packet in audio.encode(audio_frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
