"""`cosmos3` command line: generate (flags or Framework spec files), reason, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmos3.errors import RequestError
from cosmos3.generation.dialects import MODES, dialect
from cosmos3.generation.request import GenerateRequest, check_name
from cosmos3.reason_request import REASONER_OUTPUT, ReasonRequest, is_reasoner_entry, reason, request_from_entry
from cosmos3.reasoning.scheduler import PREFILL_CHUNK
from cosmos3.server.limits import Limits


def _on_off_auto(text: str) -> bool | str:
    choices = {"on": True, "off": False, "auto": "auto"}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of on, off, auto")
    return choices[text]


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from exc


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny', a checkpoint folder, or a hub id (downloaded once)")
    p.add_argument("--revision", help="hub branch, tag or commit for a hub id --model (default: main)")
    p.add_argument(
        "--no-guardrails",
        dest="guardrails",
        action="store_false",
        default=None,
        help="load no safety checker (default: the checkpoint's setting, on for released checkpoints)",
    )
    p.add_argument(
        "--guardrail",
        help="a custom safety checker, MODULE:NAME (a class or an object with "
        "check_text(prompt) -> bool and check_video(frames) -> frames | None)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument(
        "--surfaces", type=lambda v: v.split(","), help="generator,reasoner (default: what the folder holds)"
    )
    p.add_argument("--fp8", action="store_true", help="FP8 matmuls in the generation pathway (Hopper)")
    p.add_argument(
        "--fp8-attention", action="store_true", help="FP8 attention in the generation pathway (Hopper, cuDNN)"
    )
    switches = {  # on (the bare flag), off or auto: the Engine's True / False / "auto"
        "--compile": "torch.compile the generation layer: on (bare --compile), off, or auto (default: on a single "
        "GPU, for 480p video and larger)",
        "--flash-attention": "FlashAttention-4 for the generation attention (flash-attn-4 package, Hopper/Blackwell): "
        "on (bare --flash-attention), off, or auto (default: where installed, for 256p video and larger)",
    }
    for flag, text in switches.items():
        p.add_argument(flag, nargs="?", const=True, default="auto", type=_on_off_auto, help=text)
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run every denoising pass eagerly (default: passes of 720p images and 256p video replay from a CUDA "
        "graph on one GPU)",
    )
    p.add_argument(
        "--fast", action="store_true", help="FP8 matmuls and attention + compile + step cache 0.1 (README: Speed)"
    )
    p.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles (less memory)")
    # Seed 001's scaling flags; the world size is their product. Started here, one process per GPU (or torchrun).
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="split heads and MLPs over N GPUs")
    p.add_argument("--cfg-parallel-size", type=int, default=1, choices=(1, 2), help="2: the CFG branches on 2 GPUs")
    p.add_argument("--ulysses-degree", type=int, default=1, help="split the generated tokens over K GPUs")
    p.add_argument(
        "--enable-layerwise-offload",
        dest="layerwise_offload",
        action="store_true",
        help="keep the transformer layers in CPU memory, streamed to the GPU a layer ahead",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosmos3", description="Run the Cosmos 3 omni world models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images, videos, sound and actions")
    add_model_args(g)
    g.add_argument(
        "--spec",
        help="Framework inference entries: a JSON object or list, JSONL, or `cosmos3 upsample` output "
        "(vision_path, action_path, action_stats relative to it); model_mode reasoner entries write "
        "<name>/reasoner_text.txt; a failing entry does not stop the others",
    )
    g.add_argument("--output", help="output file (.mp4, .jpg, .png); default outputs/<mode>.<ext>")
    g.add_argument("--output-dir", default="outputs", help="where --spec runs write <name>/vision.* (default outputs)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="skip outputs already complete for the same resolved request (their sidecar's request_sha256)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs (default: an existing one is an error)"
    )
    g.add_argument("--mode", choices=MODES, default=None)
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt")
    g.add_argument("--num-frames", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--resolution", help="tier: 256, 480, 720 (action modes also 704)")
    g.add_argument("--aspect-ratio", help="16,9 4,3 1,1 3,4 9,16")
    g.add_argument("--fps", type=float)
    g.add_argument("--num-steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--shift", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--image", help="conditioning image (image2video, policy, forward_dynamics)")
    g.add_argument("--video", help="conditioning video (video2video, action modes)")
    g.add_argument("--enable-sound", action="store_true", default=None)
    g.add_argument("--no-system-prompt", dest="use_system_prompt", action="store_false", default=None)
    g.add_argument("--no-resolution-template", dest="use_resolution_template", action="store_false", default=None)
    g.add_argument("--no-duration-template", dest="use_duration_template", action="store_false", default=None)
    g.add_argument("--condition-frame-indexes-vision", type=_int_list, help="latent frames kept clean, e.g. 0,1")
    g.add_argument("--condition-video-keep", choices=("first", "last"))
    g.add_argument("--domain-name")
    g.add_argument("--action-chunk-size", type=int)
    g.add_argument("--raw-action-dim", type=int)
    g.add_argument("--action-path", dest="action", help="JSON [steps][width] actions (forward_dynamics)")
    g.add_argument("--action-stats", help="JSON per-channel normalization statistics for raw actions")
    g.add_argument("--view-point")
    g.add_argument("--chunks", type=int, help="chain N policy / forward_dynamics chunks into one rollout")
    g.add_argument(
        "--step-cache", type=float, help="reuse velocities while the input changes less than this (e.g. 0.1)"
    )

    r = sub.add_parser("reason", help="text from text, images and video")
    add_model_args(r)
    r.add_argument("--prompt", required=True)
    r.add_argument("--image", action="append", default=[])
    r.add_argument("--video", action="append", default=[])
    r.add_argument("--system")
    r.add_argument("--max-tokens", type=int, default=256)
    # Unset sampling knobs take the documents' settings (with or without --reasoning); 0 temperature is greedy.
    r.add_argument("--temperature", type=float)
    r.add_argument("--top-p", type=float)
    r.add_argument("--top-k", type=int)
    r.add_argument("--repetition-penalty", type=float)
    r.add_argument("--presence-penalty", type=float)
    r.add_argument("--frequency-penalty", type=float)
    r.add_argument("--stop", action="append", help="a stop string (repeatable)")
    r.add_argument("--n", type=int, help="choices to decode (printed one after another)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="constrain the reply to a JSON object")
    r.add_argument("--json-schema", help="constrain the reply to this JSON schema (a file)")
    r.add_argument("--stream", action="store_true", help="print the reply as it is decoded")
    r.add_argument("--reasoning", action="store_true", help="ask for explicit reasoning and print it apart")
    u = sub.add_parser("upsample", help="short prompts -> structured JSON prompts (an OpenAI endpoint or --self)")
    u.add_argument("--input", required=True, help="text file, one prompt per non-empty line")
    u.add_argument("--output", required=True, help="a .json file (array) or .jsonl (one object per line)")
    u.add_argument("--mode", required=True, choices=("text2image", "text2video", "image2video"))
    u.add_argument("--image-url", help="image2video: the first frame (URL or path) for every prompt")
    u.add_argument("--image-list", help="image2video: a file with one image URL or path per prompt")
    u.add_argument("--endpoint-url", default=os.environ.get("PROMPT_UPSAMPLER_ENDPOINT_URL"))
    u.add_argument(
        "--model",
        # Seed 000's name; PROMPT_UPSAMPLER_MODEL, this project's earlier name, still works.
        default=os.environ.get("PROMPT_UPSAMPLER_MODEL_NAME") or os.environ.get("PROMPT_UPSAMPLER_MODEL"),
        help="the endpoint's model name",
    )
    u.add_argument("--api-token", default=os.environ.get("PROMPT_UPSAMPLER_API_TOKEN"))
    u.add_argument("--self", dest="use_self", action="store_true", help="use --checkpoint's own Reasoner")
    u.add_argument("--checkpoint", default="tiny", help="for --self, and its tokenizer counts prompt tokens")
    u.add_argument("--device", default=None)
    u.add_argument("--dtype", default=None)
    u.add_argument("--resolution", default="720", help="tier written into the prompt: 256, 480, 720")
    u.add_argument("--aspect-ratio", default="16,9")
    u.add_argument("--max-tokens", type=int, help="reply budget (default 20000, the documents' setting)")
    u.add_argument("--max-field-chars", type=int, help="bound every text field of the structured prompt")

    s = sub.add_parser("serve", help="HTTP server: OpenAI / vLLM-Omni routes and the hosted /predict")
    add_model_args(s)
    add_server_args(s, port=8000)
    s.add_argument("--ui", action="store_true", help="also serve the playground at /ui")

    ui = sub.add_parser("ui", help="the playground in the browser (with the HTTP API beside it)")
    add_model_args(ui)
    add_server_args(ui, port=7860)

    b = sub.add_parser("batch", help="spec entries over GPUs and machines, on Ray; resumable")
    add_model_args(b)
    b.add_argument("spec", help="a JSON object or list, JSONL, or `cosmos3 upsample` output")
    b.add_argument(
        "--output-dir",
        required=True,
        help="<name>/vision.* (reasoner: reasoner_text.txt) per entry, and manifest.jsonl",
    )
    b.add_argument("--workers", type=int, default=1, help="engine actors (default 1)")
    b.add_argument("--gpus-per-worker", type=int, help="GPUs per actor (default: the parallel layout's, 0 on CPU)")
    b.add_argument("--address", help="a Ray cluster: auto or ray://host:port (default: a local Ray started here)")
    b.add_argument("--retries", type=int, default=2, help="retries of an entry whose worker failed (default 2)")
    return parser


def add_server_args(s: argparse.ArgumentParser, port: int) -> None:
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=port)
    s.add_argument("--served-model-name", help="the model id clients send and /v1/models lists (default: --model)")
    s.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (or 'Api-Key KEY') on every route but /health"
    )
    s.add_argument("--max-queue", type=int, default=16, help="queued generations before 429 (default 16)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="chat sequences decoded together, 1 to 64 (default 64)")
    s.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=PREFILL_CHUNK,
        help=f"chat prompt tokens prefilled per step beside the decoding ones, 16 to 32768 (default {PREFILL_CHUNK})",
    )
    s.add_argument(
        "--max-pending-chats", type=int, default=128, help="chats running or waiting before 429 (default 128)"
    )
    s.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=Limits.max_prompt_tokens,
        help=f"a chat prompt's tokens, its media's included; longer is a 400 (default {Limits.max_prompt_tokens})",
    )
    s.add_argument("--allowed-local-media-path", help="local media paths in requests must lie under this folder")
    s.add_argument("--jobs-db", default="cosmos3-server/jobs.db", help="SQLite job store (survives restarts)")
    s.add_argument("--outputs-dir", default="cosmos3-server/outputs", help="where job inputs and outputs are kept")
    s.add_argument("--retention-hours", type=float, default=24.0, help="finished jobs and files are removed after")
    s.add_argument("--max-upload-mb", type=int, default=512)
    s.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="fetch request media from loopback / private / link-local addresses (refused by default)",
    )
    s.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="queued text2image/text2video requests of one shape denoised together (1: never)",
    )
    s.add_argument(
        "--media-io-kwargs",
        metavar="JSON",
        help='the Reasoner\'s default video sampling, as in vLLM: {"video": {"num_frames": -1}} (every frame) or '
        '{"video": {"fps": 4}}; a request\'s own media_io_kwargs win field by field',
    )


FLAG_FIELDS = (
    "mode",
    "prompt",
    "negative_prompt",
    "num_frames",
    "height",
    "width",
    "resolution",
    "aspect_ratio",
    "fps",
    "num_steps",
    "guidance",
    "shift",
    "seed",
    "image",
    "video",
    "enable_sound",
    "use_system_prompt",
    "use_resolution_template",
    "use_duration_template",
    "condition_frame_indexes_vision",
    "condition_video_keep",
    "domain_name",
    "action_chunk_size",
    "raw_action_dim",
    "action",
    "action_stats",
    "view_point",
    "chunks",
    "step_cache",
)


class SpecLineError(ValueError):
    """A JSONL line that is not JSON (or not UTF-8): that entry fails, the others run."""

    def __init__(self, line: int, detail: str):
        super().__init__(f"line {line}: {detail}")
        self.line, self.detail = line, detail


def _spec_error(path: Path, allowed: str, why: str) -> RequestError:
    """An error naming the spec file: RequestError cuts a value past 80 characters, so a long path is given whole in
    the text instead."""
    if len(repr(str(path))) <= 80:
        return RequestError("spec", str(path), allowed, why)
    return RequestError("spec", path.name, allowed, f"{why} (file {path})")


def _parse_json(text: str, one_line: bool = False) -> tuple[Any, str | None]:
    """(value, None), or (None, why it is not JSON): JSON nested past Python's recursion limit is an answer too,
    not a RecursionError. `one_line`: the place is given as a column (the caller names the line)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({f'{exc.msg}, column {exc.colno}' if one_line else exc})"
    except RecursionError:
        return None, "is JSON nested too deeply to read (past Python's recursion limit)"


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    return f"is not UTF-8 text (byte 0x{data[exc.start]:02x}: {exc.reason})"


def read_spec(path: Path) -> list[Any]:
    """The entries of a spec file: a JSON object or a list of them, JSON Lines (`.jsonl`, or any file whose
    non-empty lines are each one JSON value), or `cosmos3 upsample` output (the same, of structured prompts).
    A bad JSONL line (not JSON, not UTF-8) becomes a `SpecLineError` entry, so that one broken line fails alone."""
    allowed = "a UTF-8 JSON object or list, or JSON Lines"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _spec_error(path, "a readable JSON or JSONL file", f"cannot be read ({exc})") from exc
    if path.suffix.lower() == ".jsonl":  # decoded and parsed line by line, so that only the broken lines fail
        entries: list[Any] = []
        for n, raw in enumerate(data.split(b"\n"), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                entries.append(SpecLineError(n, _not_utf8(raw, exc)))
                continue
            if line.strip():
                value, error = _parse_json(line, one_line=True)
                entries.append(value if error is None else SpecLineError(n, error))
        return entries
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _spec_error(path, allowed, f"line {line} {_not_utf8(data, exc)}") from exc
    value, error = _parse_json(text)
    if error is None:
        return value if isinstance(value, list) else [value]
    entries = []  # JSON Lines under another name: only if every line parses
    for line in (line for line in text.splitlines() if line.strip()):
        value, line_error = _parse_json(line)
        if line_error is not None:
            raise _spec_error(path, allowed, error)
        entries.append(value)
    if len(entries) < 2:
        raise _spec_error(path, allowed, error)
    return entries


def is_structured_prompt(entry: dict[str, Any]) -> bool:
    """An upsampled prompt (`cosmos3 upsample` output): a `subjects` list and only the cookbook's keys."""
    from cosmos3.upsample import IMAGE_KEYS, VIDEO_KEYS

    return isinstance(entry.get("subjects"), list) and set(entry) <= IMAGE_KEYS | VIDEO_KEYS


def prompt_entry(obj: dict[str, Any]) -> dict[str, Any]:
    """A structured prompt as a Framework entry: the JSON is the prompt; the mode (image keys, or no duration and
    fps: text2image) and the canvas and fps the upsampler wrote into it are taken from it. Flags still override
    them (`--mode image2video --image first.jpg` for image2video prompts)."""
    from cosmos3.generation.request import FPS_VALUES, RESOLUTIONS

    image = bool({"comprehensive_t2i_caption", "quadrant_scan"} & set(obj)) or not ({"duration", "fps"} & set(obj))
    entry: dict[str, Any] = {"prompt": json.dumps(obj), "model_mode": "text2image" if image else "text2video"}
    size = obj.get("resolution")
    if isinstance(size, dict):
        for tier, ratios in RESOLUTIONS.items():
            for ratio, (w, h) in ratios.items():
                if (w, h) == (size.get("W"), size.get("H")):
                    entry["resolution"], entry["aspect_ratio"] = tier, ratio
    if not image and obj.get("fps") in FPS_VALUES:
        entry["fps"] = float(obj["fps"])
    return entry


@dataclass
class Job:
    """One output to make: a spec entry or the flags' request."""

    label: str
    output: Path
    request: GenerateRequest | ReasonRequest | None
    error: str | None = None  # set when the entry failed
    status: str = "pending"  # then written, skipped or failed

    def fail(self, message: str) -> None:
        self.error, self.status = message, "failed"


# The generate flags a reasoner entry takes (ReasonRequest's fields); a flag's image/video replace its vision_path.
REASONER_FLAGS = ("prompt", "seed", "image", "video")


def spec_entries(spec_path: Path, flags: dict[str, Any]) -> list[tuple[str, dict[str, Any] | RequestError]]:
    """(name, Framework entry) per entry of a spec file, or (name, the RequestError of an entry that cannot be
    read). Upsampled prompts become entries; the entry's paths are relative to the spec file; `flags` override
    every entry's fields, under either name (`--mode` replaces `model_mode`, `--image`/`--video` `vision_path`)."""
    aliases = dialect("framework").aliases
    out: list[tuple[str, dict[str, Any] | RequestError]] = []
    for i, entry in enumerate(read_spec(spec_path)):
        label = f"sample_{i}"
        try:
            if isinstance(entry, SpecLineError):
                raise _spec_error(spec_path, "one UTF-8 JSON object per line", f"line {entry.line} {entry.detail}")
            if not isinstance(entry, dict):
                raise RequestError(f"spec[{i}]", entry, "a JSON object")
            if is_structured_prompt(entry):
                entry = prompt_entry(entry)
            # A reasoner entry takes the flags it has fields for (the prompt, seed and media); the Generator's
            # flags of a mixed run (--num-steps ...) are not its. --mode names a Generator mode: it wins, as the
            # Framework's --model-mode does for every sample.
            reasoner = "mode" not in flags and is_reasoner_entry(entry)
            used = {k: v for k, v in flags.items() if not reasoner or k in REASONER_FLAGS}
            entry = {k: v for k, v in entry.items() if aliases.get(k) not in used}
            if "image" in used or "video" in used:
                entry.pop("vision_path", None)
            for key in ("vision_path", "action_path", "action_stats"):  # the entry's paths, not the flags'
                value = entry.get(key)
                remote = not isinstance(value, str) or "://" in value or value.startswith("data:")
                if not remote and not Path(value).is_absolute():
                    entry[key] = str(spec_path.parent / value)
            entry = {**entry, **used}
            name = entry.get("name")
            if name is not None:  # its folder under --output-dir; here too for reasoner entries, before any load
                check_name(name)
            out.append((name or label, entry))
        except RequestError as exc:
            out.append((label, exc))
    return out


def jobs_from_args(args: argparse.Namespace) -> list[Job]:
    """The jobs of a run: the flags' one request, or one per spec entry (flags given with --spec override every
    entry). A spec entry that cannot be read is a failed job; the flags' request raises."""
    flags = {k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k, None) is not None}
    if not args.spec:
        flags.setdefault("mode", "text2video")
        req = GenerateRequest.from_dict(flags)
        ext = "jpg" if req.mode == "text2image" else "mp4"
        output = Path(args.output or f"{args.output_dir}/{req.mode}.{ext}")
        return [Job(str(output), output, req)]
    if args.output:
        raise RequestError("output", args.output, "unset with --spec (entries write <output-dir>/<name>/vision.*)")
    jobs = []
    for label, entry in spec_entries(Path(args.spec), flags):
        try:
            if isinstance(entry, RequestError):
                raise entry
            req = request_from_entry(entry, "framework")
        except RequestError as exc:
            jobs.append(Job(label, Path(args.output_dir) / label, None, f"{exc}", "failed"))
            continue
        jobs.append(Job(label, Path(args.output_dir) / label / entry_output(req), req))
    return jobs


def entry_output(req: GenerateRequest | ReasonRequest) -> str:
    """The file an entry writes in its folder, as the Framework names it."""
    if isinstance(req, ReasonRequest):
        return REASONER_OUTPUT
    return "vision.jpg" if req.mode == "text2image" else "vision.mp4"


def _surface(req: GenerateRequest | ReasonRequest) -> str:
    return "reasoner" if isinstance(req, ReasonRequest) else "generator"


def _guardrails(args: argparse.Namespace):
    """--guardrail MODULE:NAME (custom checker), --no-guardrails (False) or the checkpoint's default (None)."""
    if not getattr(args, "guardrail", None):
        return args.guardrails
    import importlib

    module, _, name = args.guardrail.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RequestError(
            "guardrail", args.guardrail, "MODULE:NAME of an importable checker", f"failed ({exc})"
        ) from exc
    return obj() if isinstance(obj, type) else obj


def _engine_options(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of `cosmos3.load` that the model flags set."""
    names = ("device", "dtype", "surfaces", "fp8", "fp8_attention", "flash_attention", "compile", "fast", "vae_tiling")
    names += ("cuda_graphs", "layerwise_offload", "revision")
    names += ("tensor_parallel_size", "cfg_parallel_size", "ulysses_degree")
    return {**{name: getattr(args, name) for name in names}, **overrides}


def cmd_generate(args: argparse.Namespace) -> int:
    """Make every job's output. A single request raises on error (exit status 2 for a RequestError); a spec run
    records a failing entry, goes on, and ends with a summary (exit status 1 if any entry failed)."""
    from tqdm.auto import tqdm

    from cosmos3.engine import TINY_DEFAULTS, load
    from cosmos3.generation.result import output_paths

    if args.resume and args.overwrite:
        raise RequestError("overwrite", True, "either --resume or --overwrite", "conflicts with --resume")
    batch = bool(args.spec)
    jobs = jobs_from_args(args)
    defaults = TINY_DEFAULTS if args.model == "tiny" else {}
    owners: dict[Path, str] = {}
    for job in jobs:  # fail fast, before the model loads (the VAE-dependent checks wait for it)
        if job.error is not None:
            continue
        try:
            surface = _surface(job.request)
            if args.surfaces and surface not in args.surfaces:
                raise RequestError(
                    "model_mode",
                    job.request.mode,
                    f"a mode of the surfaces this run loads (--surfaces {','.join(args.surfaces)})",
                    f"needs the {surface} surface",
                )
            if surface == "reasoner":
                job.request.resolved()
            else:
                job.request.resolved(defaults)
            if job.output in owners:
                raise RequestError("name", job.label, "a distinct name for every entry", f"writes {job.output} too")
            owners[job.output] = job.label
            if not args.resume and not args.overwrite:
                _check_free(output_paths(job.output, job.request.mode))
        except RequestError as exc:
            if not batch:
                raise
            job.fail(str(exc))
    todo = [job for job in jobs if job.error is None]
    options = _engine_options(args, guardrails=_guardrails(args))
    if todo and not args.surfaces and all(_surface(job.request) == "reasoner" for job in todo):
        options["surfaces"] = ["reasoner"]  # only reasoner entries: no generation pathway, VAE or audio codec
    engine = load(args.model, **options) if todo else None
    bar = tqdm(todo, desc="entries", unit="entry", disable=not (batch and todo))
    for job in bar:
        try:
            job.status = _make(engine, job, args, write=bar.write if batch else print)
        except Exception as exc:  # a spec run goes on past any failing entry; a single request reports it
            if not batch:
                raise
            job.fail(str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}")
    bar.close()
    if not batch:
        return 0
    counts = {status: sum(job.status == status for job in jobs) for status in ("written", "skipped", "failed")}
    print(
        f"{len(jobs)} entries: {counts['written']} written, {counts['skipped']} skipped (complete), "
        f"{counts['failed']} failed"
    )
    for job in jobs:
        if job.status == "failed":
            print(f"failed: {job.label}: {job.error}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _check_free(paths: list[Path], why: str = "") -> None:
    """Never overwrite silently: an existing output is an error that names it."""
    for path in paths:
        if path.exists():
            raise RequestError(  # the whole path in the text: the value shown is cut at 80 characters
                "output",
                path.name,
                "a path that does not exist yet (--overwrite replaces it; --resume skips outputs that are complete "
                "for the same request)",
                f"exists: {path}{why}",
            )


def _make(engine, job: Job, args: argparse.Namespace, write: Callable[[str], None]) -> str:
    """Resolve the job's request once, skip it if --resume finds it complete, else generate (or reason) and save."""
    from cosmos3.generation.result import is_complete, output_paths, read_sidecar, request_json, request_key

    if isinstance(job.request, ReasonRequest):
        resolved = job.request.resolved()
        key = resolved.key()
    else:
        resolved = engine.request(job.request)
        key = request_key(resolved)
    if args.resume and is_complete(job.output, key):
        write(f"skipped {job.output}: complete for this request")
        return "skipped"
    if args.resume:  # an unfinished output of this very request is redone; anything else is left alone
        sidecar = read_sidecar(job.output)
        if sidecar is None:
            _check_free([job.output], ", with no sidecar, so it is not known to be this request's")
        elif sidecar.get("request_sha256") != key:
            _check_free(output_paths(job.output, resolved.mode), ", made for a different request")
    if isinstance(resolved, ReasonRequest):
        result = reason(engine, resolved)
        arguments = resolved.as_json()
    else:
        result = engine.generate(resolved)  # the engine records what made the result, for its sidecar
        arguments = request_json(resolved)
    for path in result.save(job.output):
        write(f"wrote {path}")
    if args.spec:  # the Framework's record of an entry's arguments, beside its outputs
        (job.output.parent / "sample_args.json").write_text(json.dumps(arguments))
    return "written"


def cmd_reason(args: argparse.Namespace) -> int:
    from cosmos3.engine import load
    from cosmos3.reasoning.reasoner import split_reasoning

    content = [{"type": "image_url", "image_url": {"url": str(Path(p).resolve())}} for p in args.image]
    content += [{"type": "video_url", "video_url": {"url": str(Path(p).resolve())}} for p in args.video]
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": content})
    knobs = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "n")
    sampling: dict[str, Any] = {k: getattr(args, k) for k in knobs if getattr(args, k) is not None}
    sampling.update(max_tokens=args.max_tokens, seed=args.seed, reasoning=args.reasoning, stop=args.stop or [])
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        # ValueError: not JSON or not UTF-8; RecursionError: nested too deeply
        except (OSError, ValueError, RecursionError) as exc:
            why = f"cannot be read ({type(exc).__name__}: {exc})"
            raise RequestError("json_schema", args.json_schema, "a readable UTF-8 JSON schema file", why) from exc
        sampling["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    elif args.json:
        sampling["response_format"] = {"type": "json_object"}
    engine = load(args.model, **_engine_options(args, surfaces=args.surfaces or ["reasoner"]))
    if args.stream:
        for piece in engine.reason_stream(messages, **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    if sampling.get("n", 1) > 1:
        for i, text in enumerate(engine.reason_choices(messages, **sampling)):
            print(f"--- choice {i}\n{text}")
        return 0
    text = engine.reason(messages, **sampling)
    if args.reasoning:
        reasoning, answer = split_reasoning(text)
        print(f"reasoning: {reasoning}\nanswer: {answer}")
    else:
        print(text)
    return 0


def _text_lines(path: str, field: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; an unreadable file is a RequestError naming `field`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError(field, path, "a readable UTF-8 text file", f"cannot be read ({exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def cmd_upsample(args: argparse.Namespace) -> int:
    from cosmos3.engine import load
    from cosmos3.upsample import (
        CONDITIONING_TOKEN_LIMIT,
        Upsampler,
        as_image_url,
        count_tokens,
        endpoint_completer,
        self_completer,
    )

    prompts = _text_lines(args.input, "input")
    images: list[str | None] = [args.image_url] * len(prompts)
    if args.image_list:
        images = _text_lines(args.image_list, "image_list")
        if len(images) != len(prompts):
            raise RequestError("image_list", f"{len(images)} images", f"{len(prompts)} images, one per prompt")
    if args.use_self:
        engine = load(args.checkpoint, device=args.device, dtype=args.dtype, surfaces=["reasoner"])
        complete, tokenizer = self_completer(engine, args.max_tokens), engine.reasoner.tokenizer
    else:
        if not args.endpoint_url or not args.model:
            missing = "endpoint_url" if not args.endpoint_url else "model"
            raise RequestError(
                missing,
                None,
                "--endpoint-url and --model (or the PROMPT_UPSAMPLER_* variables), or --self",
                "is missing",
            )
        complete = endpoint_completer(args.endpoint_url, args.model, args.api_token)
        from transformers import AutoTokenizer

        from cosmos3.loading.components import TOKENIZER_FILES, resolve_path

        # Only its tokenizer is needed here: a hub checkpoint is fetched without its weights.
        path = resolve_path(args.checkpoint, patterns=TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(
            path / "text_tokenizer" if (path / "text_tokenizer").is_dir() else path
        )
    upsampler = Upsampler(
        args.mode,
        complete,
        resolution=str(args.resolution),
        aspect_ratio=args.aspect_ratio,
        max_field_chars=args.max_field_chars,
    )
    results = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        obj = upsampler.upsample(prompt, as_image_url(image) if image else None)
        n = count_tokens(tokenizer, obj)
        if n > CONDITIONING_TOKEN_LIMIT:
            print(
                f"prompt {i + 1}: {n} tokens, over the model's {CONDITIONING_TOKEN_LIMIT}-token conditioning "
                "limit (written in full, not cut: shorten it or expect truncation downstream)",
                file=sys.stderr,
            )
        results.append(obj)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in results))
    else:
        out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} ({len(results)} prompts)")
    return 0


def _bounded(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise RequestError(name, value, f"{lo} to {hi}")
    return value


def _server_settings(args: argparse.Namespace):
    from cosmos3.reasoning.scheduler import MAX_SLOTS
    from cosmos3.server.chat import media_io_default
    from cosmos3.server.settings import Settings

    return Settings(
        model_name=args.served_model_name or args.model,
        api_key=args.api_key,
        max_queue=args.max_queue,
        allowed_local_media_path=Path(args.allowed_local_media_path).resolve()
        if args.allowed_local_media_path
        else None,
        # --allow-private-media-urls (or COSMOS3_ALLOW_PRIVATE_URLS=1): fetch media from private addresses too
        allow_private_urls=args.allow_private_media_urls or os.environ.get("COSMOS3_ALLOW_PRIVATE_URLS") == "1",
        jobs_db=Path(args.jobs_db),
        outputs_dir=Path(args.outputs_dir),
        retention_s=args.retention_hours * 3600,
        max_batch=args.max_batch,
        max_num_seqs=_bounded("max_num_seqs", args.max_num_seqs, 1, MAX_SLOTS),
        max_num_batched_tokens=_bounded("max_num_batched_tokens", args.max_num_batched_tokens, 16, 32768),
        media_io_kwargs=media_io_default(args.media_io_kwargs) if args.media_io_kwargs is not None else None,
        limits=Limits(
            max_upload_bytes=args.max_upload_mb * 2**20,
            max_pending_chats=_bounded("max_pending_chats", args.max_pending_chats, 1, 4096),
            max_prompt_tokens=_bounded("max_prompt_tokens", args.max_prompt_tokens, 16, 2**20),
        ),
    )


def cmd_serve(args: argparse.Namespace, playground: str | None = None) -> int:
    """The HTTP API; with the playground mounted at `playground` (`serve --ui`: /ui; `cosmos3 ui`: /)."""
    from cosmos3.engine import load
    from cosmos3.server.app import create_app
    from cosmos3.server.serve import build_server

    playground = playground or ("/ui" if getattr(args, "ui", False) else None)
    if playground and args.api_key:  # a browser sends no bearer key: the page would answer 401 to its own users
        raise RequestError("api_key", "<set>", "unset with the playground (put it behind your own login proxy)")
    settings = _server_settings(args)
    engine = load(args.model, **_engine_options(args, guardrails=_guardrails(args)))
    if engine.reasoner is not None and engine.transformer.compiled_und_in is not None:
        start = time.perf_counter()
        print("compiling the Reasoner's decode step (seconds; a warm Inductor cache makes it quicker)", flush=True)
        engine.reasoner.warm_up()
        print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
    app = create_app(engine, settings)
    if playground:
        from cosmos3.ui.app import mount

        mount(app, playground)
    where = f" (playground at http://{args.host}:{args.port}{playground})" if playground else ""
    print(f"serving {args.model} on http://{args.host}:{args.port}{where} (jobs: {settings.jobs_db})", flush=True)
    build_server(app, args.host, args.port).run()
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    try:
        from cosmos3 import batch
    except ImportError as exc:
        raise RequestError("batch", "ray", "Ray installed: pip install 'cosmos3[batch]'", "is missing") from exc
    entries, invalid = [], {}
    for name, entry in spec_entries(Path(args.spec), {}):
        if isinstance(entry, RequestError):
            invalid[name] = str(entry)
        else:
            entries.append(batch.Entry(name, entry))
    options = _engine_options(args, guardrails=_guardrails(args))
    if entries and not args.surfaces and all(is_reasoner_entry(e.spec) for e in entries):
        options["surfaces"] = ["reasoner"]  # only reasoner entries: the actors load no generation pathway
    gpus = args.gpus_per_worker
    if gpus is None:  # one actor per parallel layout, on GPUs when the driver sees any
        import torch

        layout = args.tensor_parallel_size * args.cfg_parallel_size * args.ulysses_degree
        gpus = layout if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else 0
    summary = batch.run(
        entries,
        Path(args.output_dir),
        args.model,
        workers=args.workers,
        gpus_per_worker=gpus,
        address=args.address,
        retries=args.retries,
        options=options,
    )
    for name, error in {**invalid, **summary.errors}.items():
        print(f"failed {name}: {error}", file=sys.stderr)
    failed = summary.failed + len(invalid)
    print(
        f"{len(entries) + len(invalid)} entries: {summary.done} written, {summary.skipped} skipped (complete), "
        f"{failed} failed; {summary.throughput:.1f} entries/min; manifest {Path(args.output_dir) / batch.MANIFEST}"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "reason":
            return cmd_reason(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "ui":
            return cmd_serve(args, playground="/")
        if args.command == "batch":
            return cmd_batch(args)
        if args.command == "upsample":
            return cmd_upsample(args)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a clear line for users; the traceback stays available with COSMOS3_DEBUG=1
        import os

        if os.environ.get("COSMOS3_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
