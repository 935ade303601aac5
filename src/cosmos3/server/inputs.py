"""Request media: uploads, URLs, data URIs and allow-listed local paths -> checked files in the job's folder.

Every source is capped in bytes (data URIs count like uploads), and what it decodes to is checked against the
operator's input limits (pixels, frames, duration) before anything large is decoded. Errors name the field and
the problem and never show a server path. These functions block (network, decoding): routes call them off the
event loop."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import UploadFile
from PIL import Image

from cosmos3.errors import RequestError
from cosmos3.media import fetch_bytes, probe_media
from cosmos3.server.errors import APIError
from cosmos3.server.settings import Settings
from cosmos3.server.wire import load_json


async def read_upload(upload: UploadFile, field: str, settings: Settings) -> bytes:
    limit = settings.limits.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"{field} is larger than this server's {limit} byte upload limit", field)
    if not data:
        raise APIError(400, f"{field} is empty", field)
    return data


def fetch(url: Any, field: str, settings: Settings) -> bytes:
    """A URL (public hosts unless the operator allows private ones), a data URI or an allow-listed local path."""
    allowed = settings.allowed_local_media_path
    try:
        return fetch_bytes(
            url,
            field,
            allowed_dir=allowed,
            allow_local=allowed is not None,
            max_bytes=settings.limits.max_upload_bytes,
            timeout_s=settings.fetch_timeout_s,
            allow_private=settings.allow_private_urls,
        )
    except RequestError as exc:
        status = 413 if "too large" in str(exc) else 400
        raise APIError(status, settings.scrub(str(exc)), field) from exc


def store_media(
    data: bytes, folder: Path, field: str, settings: Settings, expect: str | None = None
) -> tuple[Path, str]:
    """Check decoded bounds and keep the media in the job's folder: images as RGB PNG, videos as they came.
    Returns (path, "image" | "video")."""
    limits = settings.limits
    try:
        info = probe_media(
            data,
            field,
            max_pixels=limits.max_input_pixels,
            max_frames=limits.max_input_frames,
            max_seconds=limits.max_input_seconds,
        )
    except RequestError as exc:
        raise APIError(400, str(exc), field) from exc
    if expect is not None and info.kind != expect:
        raise APIError(
            400, f"{field} holds {'an' if info.kind == 'image' else 'a'} {info.kind}; it must be {expect}", field
        )
    folder.mkdir(parents=True, exist_ok=True)
    stem = field.replace(".", "_").replace("[", "_").replace("]", "")
    if info.kind == "image":
        path = folder / f"{stem}.png"
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").save(path)
    else:
        path = folder / f"{stem}.mp4"
        path.write_bytes(data)
    return path, info.kind


def store_file(data: bytes, folder: Path, field: str, suffix: str) -> Path:
    """Non-media inputs (an action JSON file) kept as they came."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{field.replace('.', '_')}{suffix}"
    path.write_bytes(data)
    return path


def store_action_files(fields: dict[str, Any], wire: dict[str, str], folder: Path, settings: Settings) -> None:
    """`action` / `action_stats` given as a string (a URL, data URI or allow-listed path, fetched by the operator's
    rules) -> a JSON file in the job's folder, in place. `wire`: request field -> the name the client used."""
    for key in ("action", "action_stats"):
        value = fields.get(key)
        if isinstance(value, str):
            param = wire.get(key, key)
            data = fetch(value, param, settings)
            load_json(data, param, "a JSON file")
            fields[key] = str(store_file(data, folder, key, ".json"))
