"""Request media for the server: uploads, URLs and local paths, each with its limits, stored with the job."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import UploadFile
from PIL import Image

from cosmos3.media import fetch_bytes
from cosmos3.server.app import APIError, Settings


def sniff(data: bytes) -> str:
    """'image' or 'video', decided from the bytes (not the file name)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        return "image"
    except Exception:
        return "video"


def store(data: bytes, folder: Path, stem: str) -> tuple[Path, str]:
    kind = sniff(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.{'png' if kind == 'image' else 'mp4'}"
    if kind == "image":  # normalise to PNG so that any PIL-readable upload works later
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").save(path)
    else:
        path.write_bytes(data)
    return path, kind


async def save_upload(upload: UploadFile, folder: Path, field: str, settings: Settings) -> tuple[Path, str]:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, f"{field} is larger than the {settings.max_upload_bytes // 2**20} MiB upload limit", field)
    if not data:
        raise APIError(400, f"{field} is empty", field)
    return store(data, folder, field)


def fetch(url: Any, folder: Path, field: str, settings: Settings) -> tuple[Path, str]:
    """A URL, data URI or (allow-listed) local path -> a file in the job folder."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{field} must be a URL, a data URI or a local path string", field)
    allowed = settings.allowed_local_media_path
    data = fetch_bytes(url, field, allowed_dir=allowed, allow_local=allowed is not None)
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, f"{field} is larger than the {settings.max_upload_bytes // 2**20} MiB limit", field)
    return store(data, folder, field.replace(".", "_"))


def check_model(requested: str | None, settings: Settings) -> None:
    if requested is not None and requested != settings.model_name:
        raise APIError(400, f"Model mismatch: this server serves {settings.model_name!r}, not {requested!r}", "model")
