"""Image, video and audio in and out (PIL and PyAV)."""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
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
MAX_REDIRECTS = 5
# x264's macroblock tree (mbtree) reads uninitialised heap memory in its AVX-512 code, so with it on the same frames
# give different files depending on what the process allocated before (see write_video).
# crf 17: x264's "visually lossless" quality (its documentation puts it at 17-18); preset medium is x264's default.
X264_OPTIONS = {"crf": "17", "preset": "medium", "x264-params": "mbtree=0"}


def fetch_bytes(
    url: str,
    field: str,
    allowed_dir: Path | None = None,
    allow_local: bool = True,
    *,
    max_bytes: int = MAX_FETCH_BYTES,
    timeout_s: float = FETCH_TIMEOUT_S,
    allow_private: bool | None = None,
) -> bytes:
    """http(s) (a total deadline and a size cap), `data:` URIs, `file://` and plain local paths.

    Local paths must resolve (after `..` and symlinks) under `allowed_dir` when it is given; with
    `allow_local=False` (a server started without an allowed media folder) they are refused. Every source is
    capped at `max_bytes`. URLs whose host resolves to a loopback, private, link-local or otherwise non-public
    address (checked for every address and again after each redirect) are refused unless `allow_private`; None
    allows them only where local files are unrestricted (`allow_local` without `allowed_dir`: the Python API).
    A URL that cannot be fetched gets one message whatever the reason, so that errors neither echo the remote
    reply nor tell an open port from a closed one."""
    if not isinstance(url, str) or not url:
        raise RequestError(field, url, "a URL, a data URI or a local path string")
    if url.startswith("data:"):
        return _data_uri(url, field, max_bytes)
    if url.startswith(("http://", "https://")):
        if allow_private is None:
            allow_private = allow_local and allowed_dir is None
        return _fetch_http(url, field, max_bytes, timeout_s, allow_private)
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
    if path.stat().st_size > max_bytes:
        raise RequestError(field, url, f"media up to {_mib(max_bytes)}", "is too large")
    return path.read_bytes()


def _mib(n: int) -> str:
    return f"{n / 2**20:.4g} MiB"


def _data_uri(url: str, field: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    shown = url[:40] + ("..." if len(url) > 40 else "")
    if not sep:
        raise RequestError(field, shown, "a data URI (data:<mime>;base64,<data>)", "has no comma")
    if header.endswith(";base64"):
        compact = re.sub(r"\s+", "", payload)
        if len(compact) // 4 * 3 > max_bytes:
            raise RequestError(field, shown, f"media up to {_mib(max_bytes)}", "is too large")
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(field, shown, "a data URI with valid base64 data", "is not valid base64") from exc
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise RequestError(field, shown, f"media up to {_mib(max_bytes)}", "is too large")
    return data


def is_public_address(ip: str) -> bool:
    """A globally routable unicast address (not loopback, private, link-local, shared, reserved or multicast)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


class _Unavailable(Exception):
    """Any failure to fetch a URL; reported with one message."""


def _resolve(host: str, port: int, deadline: float) -> list[str]:
    """getaddrinfo in a helper thread, so that a slow resolver counts against the deadline."""
    out: list = []

    def run() -> None:
        try:
            out.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not out or isinstance(out[0], OSError):
        raise _Unavailable()
    return list(dict.fromkeys(info[4][0] for info in out[0]))


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address checked beforehand (no second DNS lookup that could answer differently)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _fetch_http(url: str, field: str, max_bytes: int, timeout_s: float, allow_private: bool) -> bytes:
    deadline = time.monotonic() + timeout_s
    unavailable = RequestError(
        field,
        url,
        f"an http(s) URL that answers 200 with at most {_mib(max_bytes)} within {timeout_s:g} s",
        "could not be fetched",
    )
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _Unavailable()
            port = parts.port or (443 if parts.scheme == "https" else 80)
            addresses = _resolve(parts.hostname, port, deadline)
            if not allow_private and not all(is_public_address(a) for a in addresses):
                raise RequestError(
                    field,
                    url,
                    "a URL of a public host (this server does not fetch from loopback, private or link-local "
                    "addresses)",
                    "resolves to a non-public address" + (" after a redirect" if current != url else ""),
                )
            status, location, data = _get(parts, port, addresses[0], max_bytes, deadline)
            if status in (301, 302, 303, 307, 308) and location:
                current = urllib.parse.urljoin(current, location)
                continue
            if status != 200:
                raise _Unavailable()
            return data
        raise _Unavailable()  # too many redirects
    except RequestError:
        raise
    except (_Unavailable, OSError, http.client.HTTPException, ValueError) as exc:
        raise unavailable from exc


def _get(parts, port: int, ip: str, max_bytes: int, deadline: float) -> tuple[int, str | None, bytes]:
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Unavailable()
        return left

    cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = cls(parts.hostname, port, ip, timeout=remaining())
    try:
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", target, headers={"User-Agent": "cosmos3", "Accept-Encoding": "identity"})
        sock = conn.sock  # the connection drops its reference once a closing response is read
        sock.settimeout(remaining())
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.getheader("Location"), b""
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise _Unavailable()
        chunks, size = [], 0
        while True:
            sock.settimeout(remaining())
            chunk = resp.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise _Unavailable()
            chunks.append(chunk)
        return 200, None, b"".join(chunks)
    finally:
        conn.close()


@dataclass
class MediaInfo:
    kind: str  # "image" or "video"
    width: int
    height: int
    frames: int
    fps: float | None = None
    seconds: float | None = None


def probe_media(
    data: bytes,
    field: str,
    *,
    max_pixels: int | None = None,
    max_frames: int | None = None,
    max_seconds: float | None = None,
) -> MediaInfo:
    """What uploaded bytes hold, decided from the bytes (not a name), checked against the bounds before anything
    large is decoded: an image's size from its header, a video's size, duration and frame count from its
    container (frames are counted from packets; only the first is decoded, to prove the stream is readable)."""
    image_error: Exception | None = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            _check_pixels(field, "image", w, h, max_pixels)
            img.load()
        return MediaInfo("image", w, h, 1)
    except Image.DecompressionBombError as exc:
        raise RequestError(
            field, "<image>", f"an image of at most {max_pixels or Image.MAX_IMAGE_PIXELS} pixels", "is too large"
        ) from exc
    except RequestError:
        raise
    except Exception as exc:  # not an image: try a video
        if _looks_like_image(data):
            raise RequestError(field, "<image>", "a readable JPEG/PNG/WebP image", "cannot be decoded") from exc
        image_error = exc
    import av

    try:
        container = av.open(io.BytesIO(data))
    except Exception as exc:
        what = "a readable image (JPEG/PNG/WebP) or video (MP4/MOV/MKV/WebM)"
        raise RequestError(field, "<bytes>", what, "is neither an image nor a video") from (image_error or exc)
    with container:
        if not container.streams.video:
            raise RequestError(field, "<bytes>", "an image or a video with a video stream", "has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        _check_pixels(field, "video", w, h, max_pixels)
        fps = float(stream.average_rate) if stream.average_rate else None
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1e6
        if max_seconds is not None and seconds is not None and seconds > max_seconds:
            raise RequestError(field, f"{seconds:.1f} s", f"a video of at most {max_seconds:g} s", "is too long")
        frames = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    frames += 1
                    if max_frames is not None and frames > max_frames:
                        raise RequestError(
                            field, f"over {max_frames} frames", f"a video of at most {max_frames} frames", "is too long"
                        )
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(field, "<video>", "a readable MP4/MOV/MKV/WebM video", "cannot be decoded") from exc
    try:
        with av.open(io.BytesIO(data)) as container:
            first = next(container.decode(video=0), None)
    except Exception as exc:
        raise RequestError(field, "<video>", "a readable MP4/MOV/MKV/WebM video", "cannot be decoded") from exc
    if first is None or frames == 0:
        raise RequestError(field, "<video>", "a video with at least one frame", "has no frames")
    if w * h == 0:
        w, h = first.width, first.height
    return MediaInfo("video", w, h, frames, fps, seconds)


def _check_pixels(field: str, kind: str, w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise RequestError(field, f"{w}x{h}", f"{kind} frames of at most {max_pixels} pixels", "is too large")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")) or data[8:12] == b"WEBP"


def image_values(frame: Any, field: str) -> torch.Tensor:
    """An in-memory image -> float32 `[3, H, W]` in 0..255, read as the reference reads it: PIL and integer arrays
    as 0..255; float arrays in [-1, 1] (any negative value), [0, 1] (max <= 1) or 0..255. numpy is HWC, torch CHW."""
    if isinstance(frame, Image.Image):
        return torch.from_numpy(np.array(frame.convert("RGB"), copy=True)).permute(2, 0, 1).float()
    allowed = "a path, a PIL image, an HxWx3 numpy array or a 3xHxW torch tensor, of numbers"
    given = type(frame).__name__
    if isinstance(frame, (np.ndarray, torch.Tensor)):
        given = f"{given} of shape {list(frame.shape)} and dtype {frame.dtype}"  # as the caller made it
    if isinstance(frame, np.ndarray):
        numeric = frame.dtype.kind in "biuf"  # torch takes no object or string arrays
        # A copy: a caller's array may be read-only (np.asarray of a PIL image), which torch warns about.
        frame = torch.from_numpy(np.array(frame, copy=True)).permute(2, 0, 1) if frame.ndim == 3 and numeric else None
    if not isinstance(frame, torch.Tensor) or frame.ndim != 3 or frame.shape[0] != 3 or frame.is_complex():
        raise RequestError(field, given, allowed)
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
    tags: dict[str, str] | None = None,
) -> None:
    """H.264 MP4 at `fps` from uint8 `[T, H, W, 3]`; with `sound` `[channels, samples]` an AAC track is muxed.

    `tags` become container metadata (read back by ffprobe, PyAV's `container.metadata`, players)."""
    import av

    t, h, w, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    # The MP4 muxer keeps only its fixed set of keys (title, comment, ...) unless told to write free-form ones.
    options = {"movflags": "use_metadata_tags"} if tags else {}
    with av.open(str(path), mode="w", options=options) as container:
        for key, value in (tags or {}).items():
            container.metadata[key] = value
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w - w % 2, h - h % 2  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        stream.options = dict(X264_OPTIONS)  # deterministic: equal frames give equal files
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
