"""The one validated generation request that every front end (Python, CLI, spec file, HTTP) builds.

Field names follow the documents (Framework inference JSON): `model_mode`/`mode`, `prompt`, `vision_path`,
`num_steps`, `guidance`, `shift`, `fps`, `num_frames`, `resolution`, `aspect_ratio`, `seed`, `enable_sound`,
and the action fields `domain_name`, `action_chunk_size`, `raw_action_dim`, `action_path`, `view_point`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosmos3 import media
from cosmos3.errors import RequestError
from cosmos3.generation.dialects import ACTION_MODES, MODE_ALIASES, MODES, VIDEO_MODES, defaults_for, dialect

FPS_VALUES = (10, 16, 24, 30)
MIN_FRAMES, MAX_FRAMES = 5, 300

# Resolution tier x aspect ratio -> (width, height), from the documents.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "256": {"1,1": (256, 256), "4,3": (320, 256), "3,4": (256, 320), "16,9": (320, 192), "9,16": (192, 320)},
    "480": {"1,1": (640, 640), "4,3": (736, 544), "3,4": (544, 736), "16,9": (832, 480), "9,16": (480, 832)},
    "720": {"1,1": (960, 960), "4,3": (1104, 832), "3,4": (832, 1104), "16,9": (1280, 720), "9,16": (720, 1280)},
}
ACTION_TIERS = ("256", "480", "704", "720")

# Embodiment -> (domain id of the action projections, raw action width). From the reference tables.
EMBODIMENTS: dict[str, tuple[int, int | None]] = {
    "no_action": (0, None),
    "av": (1, 9),
    "camera_pose": (2, 9),
    "hand_pose": (3, 57),
    "pusht": (4, 2),
    "libero": (5, None),
    "umi": (6, 10),
    "bridge_orig_lerobot": (7, 10),
    "droid_lerobot": (8, 10),
    "robomind-franka": (8, 10),
    "galbot": (9, 30),
    "robomind-franka-dual": (12, 20),
    "robomind-ur": (13, 10),
    "agibotworld": (15, 29),
    "agibot_gear_gripper": (15, 29),
    "agibot_gear_gripper_ext": (15, 29),
    "fractal": (20, 10),
}
VIEW_POINTS = ("ego_view", "third_person_view", "wrist_view", "concat_view")


@dataclass
class GenerateRequest:
    """One generation request. Fields left None are filled by `resolved()` from the engine's and the dialect's
    defaults (`cosmos3.generation.dialects`); `resolved()` is the one place every field is checked."""

    mode: str = "text2video"
    prompt: str = ""
    negative_prompt: str | None = None
    num_frames: int | None = None  # None: 1 for text2image, the dialect's for video modes, chunk + 1 for actions
    height: int | None = None  # explicit size wins over resolution/aspect_ratio
    width: int | None = None
    resolution: str | None = None  # tier; for action modes it picks the conditioning canvas
    aspect_ratio: str | None = None
    fps: float | None = None
    num_steps: int | None = None
    guidance: float | None = None
    shift: float | None = None  # None after resolution: the checkpoint scheduler's flow_shift
    seed: int | None = None
    image: Any = None  # path, PIL image or HxWx3 uint8 array (image2video; policy/forward_dynamics)
    video: Any = None  # path or list of frames (video2video; any action mode)
    enable_sound: bool = False
    use_system_prompt: bool | None = None  # None after resolution: the checkpoint's default
    use_resolution_template: bool | None = None
    use_duration_template: bool | None = None
    condition_frame_indexes_vision: list[int] = field(default_factory=lambda: [0, 1])
    condition_video_keep: str = "first"
    # Action modes.
    domain_name: str | None = None
    action_chunk_size: int | None = None  # action modes: 1..1024, unset 16; below 4 the rollout is a still
    raw_action_dim: int | None = None  # optional cross-check of the domain's width
    action: Any = None  # [steps][width] list/array or a JSON file path (forward_dynamics)
    action_stats: Any = None  # per-channel normalisation statistics (dict or JSON file) for raw actions
    view_point: str | None = "ego_view"
    chunks: int = 1  # chained chunks for long policy / forward_dynamics rollouts
    enable_safety_check: bool = True  # run the engine's guardrail (if it has one) on the prompt and the output
    step_cache: float | None = None  # opt-in: reuse velocities while the input changes less than this (e.g. 0.1)
    name: str | None = None  # names the output in spec files and jobs
    dialect: str = "python"  # whose defaults fill unset fields: python, framework, vllm_omni, hosted
    checked: bool = False  # set by resolved(): every field filled and validated

    @classmethod
    def from_dict(cls, raw: dict[str, Any], dialect_name: str | None = None) -> GenerateRequest:
        """Build from a dict in a dialect's wire names (`model_mode`, `vision_path`, `num_inference_steps`, ...).

        Unknown keys are errors, never silently ignored."""
        raw = dict(raw)
        name = dialect_name or raw.get("dialect") or "python"
        raw["dialect"] = name
        for alias, target in dialect(name).aliases.items():
            if alias in raw:
                if target in raw:
                    raise RequestError(alias, raw[alias], f"only one of {alias!r} and {target!r}", "duplicates a field")
                raw[target] = raw.pop(alias)
        if isinstance(raw.get("mode"), str):
            raw["mode"] = MODE_ALIASES.get(raw["mode"].lower(), raw["mode"])
        vision_path = raw.pop("vision_path", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise RequestError(
                unknown[0],
                raw[unknown[0]],
                ", ".join(sorted((names - {"checked"}) | {"vision_path", *dialect(name).aliases})),
                "is not a known field",
            )
        req = cls(**raw)
        if vision_path is not None:
            is_video = str(vision_path).lower().endswith((".mp4", ".mov", ".avi", ".mkv", ".webm"))
            if is_video or req.mode in ("video2video", "inverse_dynamics"):
                req.video = vision_path
            else:
                req.image = vision_path
        return req

    @property
    def is_action(self) -> bool:
        return self.mode in ACTION_MODES

    def resolved(
        self, engine_defaults: dict[str, Any] | None = None, vae_factors: tuple[int, int] | None = None
    ) -> GenerateRequest:
        """A copy with defaults filled in and every field checked; raises RequestError naming the first bad field.

        Unset fields take the engine's defaults (e.g. smaller sizes for the tiny model), then the dialect's.
        `vae_factors` (spatial, temporal) are the loaded VAE's; without them the checks that need them wait for the
        engine. A request that is already resolved is returned as it is (resolving twice changes nothing)."""
        if self.checked:
            return self
        r = dataclasses.replace(self)
        _check_choice("mode", r.mode, MODES)
        _check_choice("dialect", r.dialect, ("python", "framework", "vllm_omni", "hosted"))
        if r.name is not None:
            check_name(r.name)
        engine_defaults = {
            k: v for k, v in (engine_defaults or {}).items() if k != "num_frames" or r.mode in VIDEO_MODES
        }
        if r.width is not None or r.height is not None:  # an explicit size wins over any default tier or size
            engine_defaults = {k: v for k, v in engine_defaults.items() if k not in ("width", "height")}
        for name, value in {**defaults_for(r.dialect, r.mode), **engine_defaults}.items():
            if getattr(r, name) is None and not (name in ("width", "height") and r.resolution is not None):
                setattr(r, name, value)
        spatial, temporal = vae_factors or (None, None)
        if dialect(r.dialect).round_num_frames_up and r.mode in VIDEO_MODES and temporal and r.num_frames:
            if isinstance(r.num_frames, int) and not isinstance(r.num_frames, bool) and r.num_frames > 0:
                r.num_frames = temporal * math.ceil((r.num_frames - 1) / temporal) + 1
        area = dialect(r.dialect).reference_area
        if area and r.mode in ("image2video", "video2video") and r.width is None and r.height is None and spatial:
            r.width, r.height = _size_from_reference(r, area, spatial)
        if not isinstance(r.prompt, str):
            raise RequestError("prompt", r.prompt, "a string (plain text or a JSON object serialised as text)")
        if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
            raise RequestError("negative_prompt", r.negative_prompt, "a string or null")
        _check_int("num_steps", r.num_steps, 1, 1000)
        _check_number("guidance", r.guidance, 0.0, 100.0)
        if r.shift is not None:
            _check_number("shift", r.shift, 1e-3, 1000.0)
        _check_int("seed", r.seed, 0, 2**63 - 1)
        if r.step_cache is not None:
            _check_number("step_cache", r.step_cache, 1e-6, 10.0)
        for name in ("enable_sound", "use_resolution_template", "use_duration_template", "enable_safety_check"):
            if not isinstance(getattr(r, name), bool):
                raise RequestError(name, getattr(r, name), "true or false")
        if r.use_system_prompt is not None and not isinstance(r.use_system_prompt, bool):
            raise RequestError("use_system_prompt", r.use_system_prompt, "true, false or null")
        r.resolution = str(r.resolution)
        for name in ("image", "video", "action", "action_stats"):
            value = getattr(r, name)
            if isinstance(value, (str, Path)) and not Path(value).is_file():
                raise RequestError(name, str(value), "a path to an existing local file", "does not exist")
        if r.is_action:
            _check_action(r, temporal)
        else:
            _check_vision(r, spatial, temporal)
        if isinstance(r.fps, int):  # one type for the same value, so that equal requests compare equal
            r.fps = float(r.fps)
        r.checked = spatial is not None
        return r


def _size_from_reference(r: GenerateRequest, area: int, spatial: int) -> tuple[int, int]:
    """About `area` pixels at the conditioning media's aspect ratio, in multiples of the VAE's spatial factor."""
    if r.image is not None:
        w, h = media.to_pil(media.load_image(r.image, "image"), "image").size
    elif r.video is not None:
        w, h = media.load_video(r.video, "video")[0][0].size
    else:
        return None, None
    scale = math.sqrt(area / (w * h))
    return max(spatial, round(w * scale / spatial) * spatial), max(spatial, round(h * scale / spatial) * spatial)


NAME_ALLOWED = "a plain folder name: a non-empty string without '/', '\\' or NUL, and not '.' or '..'"


def check_name(value: Any) -> str:
    """An entry's `name` is the folder `<output-dir>/<name>/` that its outputs go to (spec files, batch), so it must
    be one plain folder name: `../x` or `/abs` would write outside the output folder. Subfolders (`a/b`) are refused
    too: one entry, one folder directly under the output folder (as the server's `/predict` names allow), and no
    separator to interpret per OS (a backslash separates paths on Windows)."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise RequestError("name", value, NAME_ALLOWED)
    return value


def _is_int(value: Any) -> bool:
    """An int that is not a bool (`true` is an int in Python, and would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise RequestError(name, value, ", ".join(str(a) for a in allowed))


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not _is_int(value) or not lo <= value <= hi:
        raise RequestError(name, value, f"an integer from {lo} to {hi}")


def _check_number(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(name, value, f"a number from {lo} to {hi}")
    if not lo <= value <= hi:
        raise RequestError(name, value, f"a number from {lo} to {hi}")


def _check_vision(r: GenerateRequest, spatial: int | None, temporal: int | None) -> None:
    _check_number("fps", r.fps, 1, 120)
    if r.fps not in FPS_VALUES:
        raise RequestError("fps", r.fps, ", ".join(map(str, FPS_VALUES)))
    if r.mode == "text2image":
        if r.num_frames is None:
            r.num_frames = 1
        if not _is_int(r.num_frames) or r.num_frames != 1:  # `true` and 1.0 equal 1, but are not a frame count
            raise RequestError("num_frames", r.num_frames, "1 for text2image")
    else:
        _check_int("num_frames", r.num_frames, MIN_FRAMES, MAX_FRAMES)
    if (r.height is None) != (r.width is None):
        missing = "width" if r.width is None else "height"
        raise RequestError(missing, None, "an integer given together with the other side", "is missing")
    if r.height is None:
        _check_choice("resolution", r.resolution, tuple(RESOLUTIONS))
        _check_choice("aspect_ratio", r.aspect_ratio, tuple(RESOLUTIONS[r.resolution]))
        r.width, r.height = RESOLUTIONS[r.resolution][r.aspect_ratio]
    else:
        for name in ("height", "width"):
            value = getattr(r, name)
            _check_int(name, value, 1, 4096)
            if spatial and value % spatial:
                raise RequestError(name, value, f"a multiple of {spatial} (this VAE's spatial factor), up to 4096")
    if r.enable_sound and r.num_frames == 1:
        raise RequestError("enable_sound", True, "false for text2image (sound needs a video)")
    needs = {"image2video": "image", "video2video": "video"}
    for name in ("image", "video"):
        given = getattr(r, name) is not None
        if given and needs.get(r.mode) != name:
            raise RequestError(
                name,
                "<given>",
                f"only with mode={'image2video' if name == 'image' else 'video2video'}",
                f"does not fit mode={r.mode}",
            )
        if not given and needs.get(r.mode) == name:
            raise RequestError(name, None, f"an {name} (path or array) for mode={r.mode}", "is missing")
    if r.mode == "video2video":
        idx = r.condition_frame_indexes_vision
        latent_frames = (r.num_frames - 1) // temporal + 1 if temporal else MAX_FRAMES
        allowed = f"a non-empty list of distinct latent frame indexes from 0 to {latent_frames - 1}"
        if (
            isinstance(idx, (str, bytes))
            or not isinstance(idx, (list, tuple))
            or not idx
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < latent_frames for i in idx)
        ):
            raise RequestError("condition_frame_indexes_vision", idx, allowed)
        r.condition_frame_indexes_vision = list(idx)
        _check_choice("condition_video_keep", r.condition_video_keep, ("first", "last"))
    for name in ("action", "domain_name", "action_chunk_size", "raw_action_dim", "action_stats"):
        if getattr(r, name) is not None:  # set for an action mode: refused, never silently unused
            shown = "<given>" if name in ("action", "action_stats") else getattr(r, name)
            raise RequestError(
                name, shown, f"only with mode in {', '.join(ACTION_MODES)}", f"does not fit mode={r.mode}"
            )
    if r.chunks != 1:
        raise RequestError(
            "chunks", r.chunks, "1 for vision modes (chained chunks are for policy and forward_dynamics)"
        )


def _check_action(r: GenerateRequest, temporal: int | None) -> None:
    _check_number("fps", r.fps, 1, 120)
    if r.domain_name is None:
        raise RequestError(
            "domain_name", None, ", ".join(sorted(k for k, v in EMBODIMENTS.items() if v[1])), "is missing"
        )
    if not isinstance(r.domain_name, str) or r.domain_name not in EMBODIMENTS or EMBODIMENTS[r.domain_name][1] is None:
        raise RequestError("domain_name", r.domain_name, ", ".join(sorted(k for k, v in EMBODIMENTS.items() if v[1])))
    width = EMBODIMENTS[r.domain_name][1]
    if r.raw_action_dim is not None and (not _is_int(r.raw_action_dim) or r.raw_action_dim != width):
        raise RequestError("raw_action_dim", r.raw_action_dim, f"{width} for domain_name={r.domain_name}")
    r.raw_action_dim = width
    # chunk + 1 frames are chunk // 4 + 1 latent frames (Wan VAE), the first the clean conditioning frame: below 4
    # steps no video frame is generated, and the reference returns the input frame with the chunk's actions.
    if r.action_chunk_size is None:
        r.action_chunk_size = 16  # vLLM-Omni's default when neither it nor num_frames is sent (contracts 1.6)
    _check_int("action_chunk_size", r.action_chunk_size, 1, 1024)
    frames = r.action_chunk_size + 1
    if r.num_frames is not None and (not _is_int(r.num_frames) or r.num_frames != frames):
        raise RequestError("num_frames", r.num_frames, f"unset or {frames} (action_chunk_size + 1) for action modes")
    r.num_frames = frames
    if r.height is not None or r.width is not None:
        raise RequestError(
            "height" if r.height is not None else "width",
            r.height or r.width,
            "unset for action modes (the canvas comes from resolution and the input's aspect)",
        )
    _check_choice("resolution", r.resolution, ACTION_TIERS)
    if r.view_point is not None:
        _check_choice("view_point", r.view_point, VIEW_POINTS)
    if r.image is not None and r.video is not None:
        raise RequestError("image", "<given>", "either image or video, not both", "conflicts with video")
    if r.image is None and r.video is None:
        raise RequestError("video", None, "an image or a video (inverse_dynamics: a video)", "is missing")
    if r.mode == "inverse_dynamics" and r.video is None:
        raise RequestError("video", None, "a video for inverse_dynamics", "is missing")
    if r.mode == "forward_dynamics" and r.action is None:
        raise RequestError("action", None, f"a [steps][{width}] array or a JSON file of one", "is missing")
    if r.mode != "forward_dynamics" and r.action is not None:
        raise RequestError("action", "<given>", "only with mode=forward_dynamics", f"does not fit mode={r.mode}")
    if r.enable_sound:
        raise RequestError("enable_sound", True, "false for action modes")
    _check_int("chunks", r.chunks, 1, 1000)
    if r.chunks > 1 and r.mode == "inverse_dynamics":
        raise RequestError("chunks", r.chunks, "1 for inverse_dynamics")
    if r.chunks > 1 and temporal and r.action_chunk_size % temporal:
        # A chunk makes chunk // temporal * temporal + 1 frames and the next starts from its last one, while the
        # actions move on by the whole chunk: the video would fall behind its actions with every chunk.
        raise RequestError(
            "action_chunk_size",
            r.action_chunk_size,
            f"a multiple of the VAE's temporal factor {temporal} when chunks > 1 (each chunk's last frame starts the "
            "next, and must be where its actions end)",
        )
