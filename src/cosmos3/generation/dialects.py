"""Every front end's wire names and defaults, side by side: one table, read by `GenerateRequest`.

A dialect is how a family of clients speaks: the Python API and CLI flags (`python`), the Framework's inference JSON
spec files (`framework`), vLLM-Omni's OpenAI-style routes (`vllm_omni`) and the hosted `/predict` (`hosted`). Each
front end names its dialect when it builds a request; fields the client left unset are filled from the engine's own
defaults (the tiny model's small sizes) and then from the dialect's, and the request is validated once, by the same
bounds for every dialect. Server operators cap work separately (`cosmos3.server.limits`).

Sources: seed 001 and the Framework (F) `defaults/<mode>/sample_args.json` (reference/cosmos3-api-contracts.md
section 4.3), vLLM-Omni 0.30.0 (W) section 1.6, the hosted examples (section 3.2). Where a dialect differs from the
Python defaults, the row says so; `README.md` shows the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VIDEO_MODES = ("text2video", "image2video", "video2video")
VISION_MODES = ("text2image",) + VIDEO_MODES
ACTION_MODES = ("policy", "forward_dynamics", "inverse_dynamics")
MODES = VISION_MODES + ACTION_MODES
# The Framework's (and /predict's) model_mode for the Reasoner: an entry that asks for text, not a Generator mode
# (`cosmos3.reason_request.ReasonRequest`, not `GenerateRequest`).
REASONER_MODE = "reasoner"

# The Framework renamed `policy` to `wam` on 2026-07-28; the hosted examples and vLLM-Omni still say `policy`.
MODE_ALIASES = {"wam": "policy"}
# The Framework's Reasoner sample fields (F 4.2) -> ReasonRequest's names (the Python API's / OpenAI's).
REASONER_ALIASES = {"model_mode": "mode", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class Dialect:
    name: str
    source: str
    # Wire name -> GenerateRequest field. A request that sends both names of one field is an error.
    aliases: dict[str, str]
    # Field defaults by scope: "all", then the mode's family ("image", "video", "action"), then the mode itself.
    defaults: dict[str, dict[str, Any]]
    # vLLM-Omni rounds video frame counts up to 4k+1 (the VAE's temporal factor) instead of rejecting them.
    round_num_frames_up: bool = False
    # vLLM-Omni sizes image2video / video2video without `size` to about this many pixels at the reference's aspect.
    reference_area: int | None = None
    notes: list[str] = field(default_factory=list)


def family(mode: str) -> str:
    if mode == REASONER_MODE:
        return "reasoner"
    return "image" if mode == "text2image" else "action" if mode in ACTION_MODES else "video"


# Diffusers' and the Framework's names for our fields; every dialect accepts these.
COMMON_ALIASES = {
    "model_mode": "mode",
    "action_path": "action",
    "image_size": "resolution",  # action modes: the canvas tier
    "resolution_tier": "resolution",
    "add_resolution_template": "use_resolution_template",  # diffusers
    "add_duration_template": "use_duration_template",
    "guardrails": "enable_safety_check",
}
# vLLM-Omni's and diffusers' sampling names.
VLLM_ALIASES = {
    "num_inference_steps": "num_steps",
    "guidance_scale": "guidance",
    "flow_shift": "shift",
    "generate_sound": "enable_sound",
    "sound_gen": "enable_sound",
    "action_mode": "mode",
    "chunk_size": "action_chunk_size",
    "raw_actions": "action",
}

# The Framework's built-in per-mode defaults (F 4.3); `/predict` presumably runs the same (section 3.4).
FRAMEWORK_DEFAULTS: dict[str, dict[str, Any]] = {
    "all": {
        "fps": 24,
        "seed": 0,  # F derives an unset seed from a hash of the sample name; 0 is what every hosted example sends
        "resolution": "480",  # F: "model config"; 480 is the tier the documents' examples use
        "aspect_ratio": "16,9",
        "use_resolution_template": True,
        "use_duration_template": True,
    },
    "image": {"num_steps": 50, "guidance": 4.0, "shift": 3.0, "aspect_ratio": "1,1"},
    "video": {"num_steps": 35, "guidance": 6.0, "shift": 10.0, "num_frames": 189},
    "action": {"num_steps": 30, "guidance": 1.0, "shift": 10.0, "resolution": "256"},
    # F 4.2 / 4.3's reasoner row: max_new_tokens 1024, do_sample false (greedy), temperature 1.0 when sampling,
    # repetition penalty 1.0, presence penalty 0.0. Read alone (not on top of "all"): a ReasonRequest has none of
    # the Generator's fields. Dialects without this row (Python) take the documents' chat settings (decoding.py).
    "reasoner": {
        "max_tokens": 1024,
        "do_sample": False,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "seed": 0,
    },
}

DIALECTS: dict[str, Dialect] = {
    "python": Dialect(
        name="python",
        source="seed 001: 480p, 16:9, 189 frames (7.9 s at 24 fps), 35 UniPC steps, guidance 6; shift: the "
        "checkpoint scheduler's flow_shift",
        aliases={**COMMON_ALIASES, **VLLM_ALIASES},
        defaults={
            "all": {
                "resolution": "480",
                "aspect_ratio": "16,9",
                "num_steps": 35,
                "guidance": 6.0,
                "fps": 24,
                "seed": 0,
                "use_resolution_template": True,
                "use_duration_template": True,
            },
            "video": {"num_frames": 189},
        },
    ),
    "framework": Dialect(
        name="framework",
        source="F defaults/<mode>/sample_args.json (contracts 4.3); used by `cosmos3 generate --spec`",
        aliases=dict(COMMON_ALIASES),
        defaults=FRAMEWORK_DEFAULTS,
        notes=["F's video negative prompt (defaults/neg_prompts.json) is not published; unset means empty here"],
    ),
    "hosted": Dialect(
        name="hosted",
        source="the hosted /predict examples (contracts 3.2) on the Framework's defaults (3.4)",
        aliases=dict(COMMON_ALIASES),
        defaults=FRAMEWORK_DEFAULTS,
    ),
    "vllm_omni": Dialect(
        name="vllm_omni",
        source="vLLM-Omni 0.30.0 per-mode defaults (contracts 1.6): templates off, seed 42",
        aliases={**COMMON_ALIASES, **VLLM_ALIASES},
        defaults={
            "all": {
                "fps": 24,
                "seed": 42,
                "use_resolution_template": False,
                "use_duration_template": False,
                "use_system_prompt": False,
            },
            "image": {"num_steps": 50, "guidance": 7.0, "shift": 3.0, "width": 1024, "height": 1024},
            "video": {"num_steps": 35, "guidance": 6.0, "shift": 10.0, "num_frames": 189},
            "text2video": {"width": 1280, "height": 720},
            "video2video": {"use_system_prompt": True},
            "action": {"num_steps": 30, "guidance": 1.0, "shift": 5.0, "resolution": "480"},
        },
        round_num_frames_up=True,
        reference_area=1280 * 720,
    ),
}


def dialect(name: str) -> Dialect:
    if name not in DIALECTS:
        from cosmos3.errors import RequestError

        raise RequestError("dialect", name, ", ".join(DIALECTS))
    return DIALECTS[name]


def defaults_for(name: str, mode: str) -> dict[str, Any]:
    """The dialect's defaults for one mode: its "all" row, then the mode's family, then the mode's own row."""
    table = dialect(name).defaults
    return {**table.get("all", {}), **table.get(family(mode), {}), **table.get(mode, {})}


def differences(a: str, b: str, mode: str) -> dict[str, tuple[Any, Any]]:
    """Fields whose defaults differ between two dialects for `mode` (what the README's table shows)."""
    da, db = defaults_for(a, mode), defaults_for(b, mode)
    return {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)}
