"""What a generation returns: frames, sound, actions and metadata, and how they are written to files.

`GenerationResult.save(path)` writes the media, for action results the actions (`<stem>.json`) and their plot
(`<stem>.actions.png`), and last a sidecar `<name>.json` (e.g. `out.mp4.json`): the resolved request and a hash of
it, the seed, the model path and revision, the cosmos3 version, timings and the result's shape. Every file is
written under a temporary name and renamed into place, and the sidecar comes last, so a sidecar means the files it
lists are complete (batch runs resume on that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cosmos3 import media
from cosmos3.errors import RequestError
from cosmos3.generation.request import GenerateRequest

SIDECAR_FORMAT = "cosmos3.sidecar/1"
ACTION_PLOT_MODES = ("policy", "inverse_dynamics")  # the modes whose result holds generated actions
MEDIA_FIELDS = ("image", "video", "action", "action_stats")  # request fields that may name input files


def sidecar_path(path: str | Path) -> Path:
    """`out.mp4` -> `out.mp4.json` (beside the file it describes; `out.json` holds an action result's actions)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def actions_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def action_plot_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".actions.png")


def output_paths(path: str | Path, mode: str | None) -> list[Path]:
    """Every file `save(path)` writes for a request of `mode`, the sidecar last."""
    path = Path(path)
    extra = [actions_path(path), action_plot_path(path)] if mode in ACTION_PLOT_MODES else []
    return [path, *extra, sidecar_path(path)]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """A request value as JSON: media given in memory are described by shape and content hash."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {"array": list(array.shape), "dtype": str(array.dtype), "sha256": _digest(array.tobytes())}
    if isinstance(value, Image.Image):
        return {"image": list(value.size), "mode": value.mode, "sha256": _digest(value.tobytes())}
    return {"object": type(value).__name__}


def request_json(request: GenerateRequest) -> dict[str, Any]:
    """Every field of a (resolved) request as JSON, in the Python API's names."""
    return {f.name: _jsonable(getattr(request, f.name)) for f in dataclasses.fields(request) if f.name != "checked"}


def input_digests(request: GenerateRequest) -> dict[str, str]:
    """sha256 of each input file the request names (media and action files)."""
    out = {}
    for name in MEDIA_FIELDS:
        value = getattr(request, name)
        if isinstance(value, (str, Path)) and Path(value).is_file():
            out[name] = file_digest(value)
    return out


def request_key(request: GenerateRequest, digests: dict[str, str] | None = None) -> str:
    """What identifies a request's output: its resolved fields, with input files by content (not by path, so a
    spec run from another folder, or a moved input, still matches, and an edited input does not)."""
    data = request_json(request)
    for name, digest in (input_digests(request) if digests is None else digests).items():
        data[name] = {"sha256": digest}
    return _digest(json.dumps(data, sort_keys=True).encode())


def model_info(path: str | Path | None) -> dict[str, Any]:
    """The checkpoint folder, and for a hub-cache snapshot (`models--org--name/snapshots/<commit>`) its repo and
    commit: the revision actually loaded, whatever branch or tag was asked for."""
    if path is None:
        return {"path": None, "repo_id": None, "revision": None}
    path = Path(path)
    repo_id = revision = None
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo_id = path.parent.parent.name[len("models--") :].replace("--", "/", 1)
        revision = path.name
    return {"path": str(path), "repo_id": repo_id, "revision": revision}


def cosmos3_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cosmos3")
    except PackageNotFoundError:  # run from a source tree without installing
        from cosmos3 import __version__

        return __version__


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of output `path`, or None when there is none or it is unreadable."""
    try:
        data = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(path: str | Path, key: str) -> bool:
    """`path` was written for the request with this key, and every file its sidecar lists is there."""
    sidecar = read_sidecar(path)
    if sidecar is None or sidecar.get("request_sha256") != key:
        return False
    folder = Path(path).parent
    return all((folder / name).is_file() for name in sidecar.get("files", []))


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder (same suffix: writers pick the format by it), then
    rename: a crash leaves the old file or none, never half a file under the real name."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class GenerationResult:
    video: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    latents: torch.Tensor  # final normalised vision latents [1, C, T, h, w], fp32
    sound: np.ndarray | None = None  # float32 [channels, samples]
    sample_rate: int | None = None
    action: np.ndarray | None = None  # float32 [steps, raw_action_dim]
    metadata: dict[str, Any] = field(default_factory=dict)
    request: GenerateRequest | None = None  # the resolved request that made it (see `record_origin`)
    origin: dict[str, Any] = field(default_factory=dict)  # model (path, repo_id, revision) and timings

    def record_origin(
        self, request: GenerateRequest, model_path: str | Path | None, generate_s: float | None = None
    ) -> GenerationResult:
        """Remember what made this result, for the sidecar and the MP4 tags that `save` writes."""
        self.request = request
        self.origin["model"] = model_info(model_path)
        if generate_s is not None:
            self.origin.setdefault("timings", {})["generate_s"] = round(generate_s, 3)
        return self

    def save(self, path: str | Path, *, sidecar: bool = True) -> list[Path]:
        """Write `.jpg`/`.png` (one frame) or `.mp4` (AAC muxed when there is sound; the prompt and seed as
        metadata tags); an action result also writes its actions to `<stem>.json` and a plot of every channel to
        `<stem>.actions.png`; then the sidecar `<name>.json` (unless `sidecar=False`). Returns the paths
        written, the sidecar last. Existing files are replaced (the CLI checks before it generates)."""
        start = time.perf_counter()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix in (".jpg", ".jpeg", ".png"):
            if self.video.shape[0] != 1:
                raise RequestError("output", str(path), "a .mp4 path for a video", "is an image path")
            _atomic(path, lambda p: media.write_image(p, self.video[0]))
        elif suffix == ".mp4":
            tags = self._tags()
            _atomic(path, lambda p: media.write_video(p, self.video, self.fps, self.sound, self.sample_rate, tags))
        else:
            raise RequestError("output", str(path), ".mp4, .jpg, .jpeg or .png", "has an unsupported extension")
        written = [path]
        if self.action is not None:
            meta = self.metadata.get("action", {})
            text = json.dumps({"action": self.action.tolist(), **meta})
            _atomic(actions_path(path), lambda p: p.write_text(text))
            written.append(actions_path(path))
            written.append(self._save_plot(action_plot_path(path)))
        if sidecar:
            seconds = time.perf_counter() - start
            data = self.sidecar(written, seconds)
            _atomic(sidecar_path(path), lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))
            written.append(sidecar_path(path))
        return written

    def _save_plot(self, path: Path) -> Path:
        from cosmos3.generation.action_plot import save_action_plot

        meta = self.metadata.get("action", {})
        chunk = self.request.action_chunk_size if self.request is not None else None
        mode = self.metadata.get("mode") or (self.request.mode if self.request is not None else "")
        space = meta.get("action_space", "")
        _atomic(
            path,
            lambda p: save_action_plot(
                p,
                self.action,
                meta.get("domain_name"),
                chunks=int(self.metadata.get("chunks", 1)),
                chunk_size=chunk,
                fps=self.fps,
                subtitle=", ".join(s for s in (mode, space) if s),
            ),
        )
        return path

    def _seed(self) -> int | None:
        return self.request.seed if self.request is not None else self.metadata.get("seed")

    def _tags(self) -> dict[str, str]:
        """MP4 metadata: the prompt and seed (and what else identifies the run without reading the sidecar)."""
        tags = {"comment": f"cosmos3 {cosmos3_version()}"}
        req = self.request
        if req is not None:
            tags["prompt"] = req.prompt
            if req.negative_prompt:
                tags["negative_prompt"] = req.negative_prompt
        mode = req.mode if req is not None else self.metadata.get("mode")
        if mode:
            tags["mode"] = str(mode)
        if self._seed() is not None:
            tags["seed"] = str(self._seed())
        return tags

    def sidecar(self, files: list[Path], save_s: float | None = None) -> dict[str, Any]:
        """The sidecar's content for output `files[0]` (with the other files it wrote)."""
        req = self.request
        digests = input_digests(req) if req is not None else {}
        timings = dict(self.origin.get("timings", {}))
        if save_s is not None:
            timings["save_s"] = round(save_s, 3)
        result = {
            "num_frames": int(self.video.shape[0]),
            "height": int(self.video.shape[1]),
            "width": int(self.video.shape[2]),
            "fps": self.fps,
            "sample_rate": self.sample_rate if self.sound is not None else None,
            "action_shape": list(self.action.shape) if self.action is not None else None,
            **{k: _jsonable(v) for k, v in self.metadata.items()},
        }
        return {
            "format": SIDECAR_FORMAT,
            "output": files[0].name,
            "files": [p.name for p in files] + [sidecar_path(files[0]).name],
            "request": request_json(req) if req is not None else None,  # None: saved without `record_origin`
            "request_sha256": request_key(req, digests) if req is not None else None,
            "inputs_sha256": digests,
            "seed": self._seed(),
            "model": self.origin.get("model", model_info(None)),
            "cosmos3_version": cosmos3_version(),
            "timings": timings,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "result": result,
        }
