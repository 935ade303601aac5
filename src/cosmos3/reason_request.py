"""The Reasoner's entry in Framework spec files, `cosmos3 batch` and the hosted `/predict`: `model_mode: "reasoner"`
with a prompt and an optional image or video `vision_path` (seed 003's "Reasoner Framework input").

`ReasonRequest` is the Reasoner's counterpart of `GenerateRequest` (none of whose fields applies here), built the
same way: from a dialect's wire names (unknown fields are errors naming them), its unset fields filled from the
dialect table's reasoner row (`cosmos3.generation.dialects`: the Framework's greedy decoding, 1024 tokens), and
checked once, by `Sampling`'s bounds. It then gives the messages and sampling settings that `engine.reason` (or the
server's conversations) decode. The reply is written as text to `reasoner_text.txt`, the Framework's file name
(contracts 4.4: what a Framework user's tools look for, and plain text, as the Reasoner replies), with a sidecar
`reasoner_text.txt.json` of the same format as the Generator's (`cosmos3.generation.result`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from cosmos3.errors import RequestError
from cosmos3.generation.dialects import REASONER_ALIASES, REASONER_MODE, dialect
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.result import (
    SIDECAR_FORMAT,
    _atomic,
    cosmos3_version,
    file_digest,
    model_info,
    sidecar_path,
)
from cosmos3.media import VIDEO_SUFFIXES
from cosmos3.reasoning.decoding import Sampling
from cosmos3.reasoning.messages import MAX_SAMPLING_FPS, asks_for_reasoning, positive_number

REASONER_OUTPUT = "reasoner_text.txt"
# The decoding fields a reasoner entry may set (besides prompt, vision_path and name), in ReasonRequest's names.
SAMPLING_FIELDS = (
    "max_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "seed",
    "video_fps",
)
# Fields that only sampling uses: with do_sample false (greedy) a value for one of them would be ignored.
SAMPLED_ONLY = ("temperature", "top_p", "top_k")


def is_reasoner_entry(entry: dict[str, Any]) -> bool:
    """A spec entry (or /predict body) that asks for the Reasoner."""
    mode = entry.get("model_mode", entry.get("mode"))
    return isinstance(mode, str) and mode.lower() == REASONER_MODE


def request_from_entry(entry: dict[str, Any], dialect_name: str) -> GenerateRequest | ReasonRequest:
    """The request of one Framework entry: a ReasonRequest for `model_mode: "reasoner"`, else a GenerateRequest."""
    if is_reasoner_entry(entry):
        return ReasonRequest.from_dict(entry, dialect_name)
    return GenerateRequest.from_dict(entry, dialect_name)


def _is_video(value: str) -> bool:
    """The same rule as the Generator's vision_path (the extension), and a data URI's media type."""
    text = value.lower()
    return text.startswith("data:video/") or text.split("?", 1)[0].endswith(VIDEO_SUFFIXES)


def _is_remote(value: str) -> bool:
    return value.startswith(("http://", "https://", "data:"))


@dataclass
class ReasonRequest:
    """One Reasoner request: a prompt, an optional image and/or video, decoding settings. Fields left None are
    filled by `resolved()` from the dialect's reasoner row (the Framework's and /predict's: greedy, 1024 tokens;
    a dialect without one, Python's, takes `engine.reason`'s: the documents' chat settings)."""

    mode: ClassVar[str] = REASONER_MODE
    prompt: str = ""
    image: str | None = None  # a local path, an http(s) URL or a data URI (vision_path)
    video: str | None = None
    max_tokens: int | None = None  # the Framework's max_new_tokens
    do_sample: bool | None = None  # None: true when temperature / top_p / top_k is given, else the dialect's
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None  # used only when sampling; recorded always
    video_fps: float | None = None  # video frames sampled per second (None: the processor's, 2)
    name: str | None = None
    dialect: str = "framework"
    checked: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any], dialect_name: str | None = None) -> ReasonRequest:
        """Build from a dict in the Framework / hosted wire names (`model_mode`, `vision_path`, `max_new_tokens`).
        Unknown keys are errors naming them; `enable_sound: false` is accepted and ignored (the documents send it
        to get past the Framework's argument validation), `true` is an error."""
        raw = dict(raw)
        raw["dialect"] = dialect_name or raw.get("dialect") or "framework"
        for alias, target in REASONER_ALIASES.items():
            if alias in raw:
                if target in raw:
                    raise RequestError(alias, raw[alias], f"only one of {alias!r} and {target!r}", "duplicates a field")
                raw[target] = raw.pop(alias)
        mode = raw.pop("mode", REASONER_MODE)
        if not isinstance(mode, str) or mode.lower() != REASONER_MODE:
            raise RequestError("model_mode", mode, REASONER_MODE)
        sound = raw.pop("enable_sound", None)
        if sound is not None and sound is not False:
            raise RequestError("enable_sound", sound, "false or unset (the Reasoner replies with text only)")
        vision_path = raw.pop("vision_path", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"checked"}
        unknown = sorted(set(raw) - names)
        if unknown:
            allowed = sorted(
                (names - {"image", "video"}) | {"model_mode", "vision_path", "enable_sound", "max_new_tokens"}
            )
            raise RequestError(
                unknown[0],
                raw[unknown[0]],
                f"a reasoner entry's fields: {', '.join(allowed)}",
                "is not a field of a reasoner entry",
            )
        req = cls(**raw)
        if vision_path is not None:
            if isinstance(vision_path, str) and _is_video(vision_path):
                req.video = vision_path
            else:
                req.image = vision_path
        return req

    def resolved(self) -> ReasonRequest:
        """A copy with every decoding field filled and checked; raises RequestError naming the first bad field.
        Resolving twice changes nothing."""
        if self.checked:
            return self
        r = dataclasses.replace(self)
        row = dialect(r.dialect).defaults.get(REASONER_MODE, {})
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            why = "is missing" if r.prompt in ("", None) else "is not allowed"
            raise RequestError("prompt", r.prompt, "a non-empty question or instruction for the Reasoner", why)
        for name in ("image", "video"):
            value = getattr(r, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise RequestError("vision_path", value, "a path, an http(s) URL or a data URI string")
            if not _is_remote(value) and not Path(value.removeprefix("file://")).is_file():
                raise RequestError("vision_path", value, "an existing image or video file, a URL or a data URI")
        if r.do_sample is None:
            sent = any(getattr(r, k) is not None for k in SAMPLED_ONLY)
            r.do_sample = True if sent else row.get("do_sample", True)
        if not isinstance(r.do_sample, bool):
            raise RequestError("do_sample", r.do_sample, "true or false")
        if not r.do_sample:  # greedy: a temperature of 0 says the same; any other sampling value would be ignored
            for name in SAMPLED_ONLY:
                value = getattr(r, name)
                if value is not None and not (name == "temperature" and value == 0):
                    raise RequestError(name, value, "unset while do_sample is false (greedy decoding)")
            r.temperature = 0.0
        for name in ("max_tokens", "temperature", "repetition_penalty", "presence_penalty", "seed"):
            if getattr(r, name) is None and name in row:
                setattr(r, name, row[name])
        if r.video_fps is not None and not positive_number(r.video_fps, MAX_SAMPLING_FPS):
            raise RequestError("video_fps", r.video_fps, f"a number above 0 and up to {MAX_SAMPLING_FPS:g}")
        # Sampling holds the Reasoner's bounds and the documents' settings for fields still unset (with reasoning
        # when the prompt asks for the <think> format, as engine.reason does); the request records what it used.
        params = r._sampling().resolved(asks_for_reasoning(r.messages())).check()
        for name in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "seed"):
            setattr(r, name, getattr(params, name))
        r.checked = True
        return r

    def _sampling(self) -> Sampling:
        values = {k: getattr(self, k) for k in SAMPLING_FIELDS if k not in ("do_sample", "video_fps")}
        return Sampling(**{k: v for k, v in values.items() if v is not None})

    def messages(self) -> list[dict[str, Any]]:
        """The OpenAI / Qwen3-VL conversation: the medium first, then the prompt (as `cosmos3 reason` sends it)."""
        content: list[dict[str, Any]] = []
        if self.image is not None:
            content.append({"type": "image_url", "image_url": {"url": self.image}})
        if self.video is not None:
            content.append({"type": "video_url", "video_url": {"url": self.video}})
        content.append({"type": "text", "text": self.prompt})
        return [{"role": "user", "content": content}]

    def sampling(self) -> tuple[Sampling, dict[str, Any]]:
        """(Sampling, encode keyword arguments) of a resolved request, for `Reasoner.prepare` (the server's path)."""
        encode = {"video_fps": self.video_fps} if self.video_fps is not None else {}
        return self._sampling(), encode

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `engine.reason` for a resolved request."""
        params, encode = self.sampling()
        return {**dataclasses.asdict(params), **encode}

    def as_json(self) -> dict[str, Any]:
        """Every field (resolved: every decoding setting), for the sidecar and sample_args.json."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "checked"}
        return {"mode": REASONER_MODE, **data}

    def input_digests(self) -> dict[str, str]:
        out = {}
        for name in ("image", "video"):
            value = getattr(self, name)
            if isinstance(value, str) and not _is_remote(value) and Path(value.removeprefix("file://")).is_file():
                out[name] = file_digest(value.removeprefix("file://"))
        return out

    def key(self, digests: dict[str, str] | None = None) -> str:
        """What identifies the output (`--resume`): the resolved fields, with input files by content (as the
        Generator's `request_key`: a moved input still matches, an edited one does not)."""
        data = self.as_json()
        for name, digest in (self.input_digests() if digests is None else digests).items():
            data[name] = {"sha256": digest}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def media_error(exc: RequestError) -> RequestError:
    """The Reasoner names a medium by its place in the conversation (`messages[0].content[0]`); an entry and
    /predict send it as `vision_path`, so that is the field their errors name."""
    if exc.field != "messages" and not exc.field.startswith("messages[0].content["):
        return exc
    error = RequestError("vision_path", exc.value, exc.allowed)
    error.args = ("vision_path" + str(exc)[len(exc.field) :],)
    return error


@dataclass
class ReasonResult:
    """The Reasoner's reply to one ReasonRequest, and what made it (for the sidecar)."""

    text: str
    request: ReasonRequest
    origin: dict[str, Any] = field(default_factory=dict)  # model (path, repo_id, revision) and timings

    def save(self, path: str | Path) -> list[Path]:
        """Write the reply to `path` (the text as decoded, nothing added) and then its sidecar `<name>.json`, both
        through temporary files: a sidecar means the reply beside it is complete. Returns the paths, sidecar last."""
        start = time.perf_counter()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda p: p.write_text(self.text, encoding="utf-8"))
        digests = self.request.input_digests()
        timings = {**self.origin.get("timings", {}), "save_s": round(time.perf_counter() - start, 3)}
        data = {
            "format": SIDECAR_FORMAT,
            "output": path.name,
            "files": [path.name, sidecar_path(path).name],
            "request": self.request.as_json(),
            "request_sha256": self.request.key(digests),
            "inputs_sha256": digests,
            "seed": self.request.seed,
            "model": self.origin.get("model", model_info(None)),
            "cosmos3_version": cosmos3_version(),
            "timings": timings,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "result": {"mode": REASONER_MODE, "characters": len(self.text)},
        }
        _atomic(sidecar_path(path), lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))
        return [path, sidecar_path(path)]


def reason(engine: Any, request: ReasonRequest) -> ReasonResult:
    """Run one request on an engine loaded with the reasoner surface (its media errors name vision_path)."""
    req = request.resolved()
    start = time.perf_counter()
    try:
        text = engine.reason(req.messages(), **req.kwargs())
    except RequestError as exc:
        raise media_error(exc) from exc
    timings = {"reason_s": round(time.perf_counter() - start, 3)}
    return ReasonResult(text, req, {"model": model_info(getattr(engine, "path", None)), "timings": timings})
