"""Action modes (policy, forward_dynamics, inverse_dynamics), action scaling, and chained long rollouts."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cosmos3 import media
from cosmos3.errors import RequestError
from cosmos3.generation import conditioning
from cosmos3.generation.parts import Parts
from cosmos3.generation.request import EMBODIMENTS, GenerateRequest
from cosmos3.generation.result import GenerationResult
from cosmos3.generation.sampler import Denoising, Stream
from cosmos3.model.sequence import pack

logger = logging.getLogger(__name__)


def _read_json(source: Any, field: str) -> Any:
    if isinstance(source, (str, Path)):
        try:
            return json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise RequestError(field, str(source), "a readable JSON file", f"cannot be read ({exc})") from exc
    return source


def load_actions(source: Any, width: int, field: str = "action") -> np.ndarray:
    """A `[steps][width]` list, array or JSON file (optionally `{"action": [...]}`) -> float32 `[steps, width]`."""
    data = _read_json(source, field)
    if isinstance(data, dict) and "action" in data:
        data = data["action"]
    if isinstance(data, dict):  # numpy would make a 0-d object array of it, reported as "not numeric"
        keys = ", ".join(map(str, list(data)[:5]))
        raise RequestError(
            field, f"an object with keys {keys}", f'a [steps][{width}] array of numbers, or {{"action": that array}}'
        )
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RequestError(field, "<array>", f"a [steps][{width}] array of numbers", "is not numeric") from exc
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != width:
        raise RequestError(
            field,
            f"array of shape {list(arr.shape)}",
            f"a [steps][{width}] array with steps >= 1",
            "has the wrong shape",
        )
    if not np.isfinite(arr).all():
        raise RequestError(field, "<array>", "finite numbers", "contains NaN or infinity")
    return arr


@dataclasses.dataclass
class ActionScaler:
    """Per-channel affine map between raw actions and the model's normalised space.

    Accepts `{"mean", "std"}` (z-score) or `{"min", "max"}` / `{"q01", "q99"}` (to [-1, 1]), optionally nested
    under `"action"`, like the cookbook's normaliser statistics files.
    """

    offset: np.ndarray
    scale: np.ndarray  # normalised = (raw - offset) / scale

    @classmethod
    def from_source(cls, source: Any, width: int) -> ActionScaler:
        data = _read_json(source, "action_stats")
        if isinstance(data, dict) and isinstance(data.get("action"), dict):
            data = data["action"]
        if not isinstance(data, dict):
            raise RequestError("action_stats", "<value>", "a JSON object with mean/std, min/max or q01/q99 lists")
        for lo_key, hi_key, zscore in (("mean", "std", True), ("q01", "q99", False), ("min", "max", False)):
            if lo_key in data and hi_key in data:
                lo = np.asarray(data[lo_key], dtype=np.float64)
                hi = np.asarray(data[hi_key], dtype=np.float64)
                if lo.shape != (width,) or hi.shape != (width,):
                    raise RequestError(
                        "action_stats",
                        f"{lo_key}/{hi_key} of length {lo.size}/{hi.size}",
                        f"lists of {width} numbers (the domain's action width)",
                    )
                offset, scale = (lo, hi) if zscore else ((lo + hi) / 2, (hi - lo) / 2)
                scale = np.where(np.abs(scale) < 1e-8, 1.0, scale)  # constant channels pass through unscaled
                return cls(offset.astype(np.float32), scale.astype(np.float32))
        raise RequestError("action_stats", sorted(data)[:6], "an object with mean/std, min/max or q01/q99 lists")

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        return ((raw - self.offset) / self.scale).astype(np.float32)

    def denormalize(self, normalized: np.ndarray) -> np.ndarray:
        return (normalized * self.scale + self.offset).astype(np.float32)


def warn_out_of_range(normalized: np.ndarray, scaled: bool) -> list[int]:
    """Channels of model-space actions far from the training range; logged by index. Returns them."""
    peak = np.abs(normalized).max(axis=0)
    far = [i for i, p in enumerate(peak) if p > 5.0]
    if far:
        logger.warning(
            "action channels %s reach |x| up to %.3g, far outside the normalised range (about [-1, 1]); %s",
            far,
            float(peak.max()),
            "check action_stats" if scaled else "pass action_stats to normalise raw actions",
        )
    tiny = [i for i, p in enumerate(peak) if 0 < p < 0.02]
    if tiny and len(tiny) == int((peak > 0).sum()):
        logger.warning(
            "every moving action channel (%s) stays below 0.02 in the normalised space: the actions "
            "look far too small (missing normalisation?)",
            tiny,
        )
        far += tiny
    return far


class Rollout:
    """One action chunk, or `req.chunks` chained chunks, each conditioned on the previous chunk's last frame.

    The pipeline drives it: `prepare(k)` -> denoise -> `add(job)` for each chunk, then `result()`."""

    def __init__(self, parts: Parts, req: GenerateRequest):
        self.parts, self.req = parts, req
        self.domain_id, self.width = EMBODIMENTS[req.domain_name]
        self.scaler = ActionScaler.from_source(req.action_stats, self.width) if req.action_stats is not None else None
        self.actions = self._given_actions() if req.mode == "forward_dynamics" else None
        if req.image is not None:
            self.frames = [media.to_pil(media.load_image(req.image, "image"), "image")]
        else:
            self.frames = media.load_video(req.video, "video")[0]
        self.parts_done: list[GenerationResult] = []

    def _given_actions(self) -> np.ndarray:
        req = self.req
        actions = load_actions(req.action, self.width)
        needed = req.action_chunk_size * req.chunks
        if actions.shape[0] < req.action_chunk_size * (req.chunks - 1) + 1:
            raise RequestError(
                "action",
                f"{actions.shape[0]} steps",
                f"at least {req.action_chunk_size * (req.chunks - 1) + 1} steps and at most {needed} "
                f"(chunks={req.chunks} x action_chunk_size={req.action_chunk_size}; a short last chunk repeats its "
                "last step, as the reference does)",
                "is too short",
            )
        if actions.shape[0] > needed:
            raise RequestError(
                "action",
                f"{actions.shape[0]} steps",
                f"at most {needed} steps (chunks={req.chunks} x action_chunk_size={req.action_chunk_size})",
                "is too long",
            )
        if self.scaler is not None:
            actions = self.scaler.normalize(actions)
        warn_out_of_range(actions, self.scaler is not None)
        return actions

    def prepare(self, k: int, on_step=None) -> Denoising:
        """Chunk `k`: its seed is the request's plus k; it starts from the last frame the previous chunk made."""
        req = dataclasses.replace(self.req, seed=self.req.seed + k, chunks=1)
        chunk_actions = None
        if self.actions is not None:
            chunk_actions = self.actions[k * req.action_chunk_size : (k + 1) * req.action_chunk_size]
        return prepare_chunk(self.parts, req, self.frames, chunk_actions, self.domain_id, self.width, on_step)

    def add(self, job: Denoising) -> None:
        part = finish_chunk(self.parts, job, self.width)
        self.frames = [Image.fromarray(part.video[-1])]
        self.parts_done.append(part)

    def result(self) -> GenerationResult:
        result = self.parts_done[0]
        for nxt in self.parts_done[1:]:  # drop each chunk's first frame: the previous chunk's last, repeated
            result.video = np.concatenate([result.video, nxt.video[1:]])
            if result.action is not None:
                result.action = np.concatenate([result.action, nxt.action])
            result.latents = torch.cat([result.latents, nxt.latents[:, :, 1:]], dim=2)
        if result.action is not None and self.scaler is not None:
            result.action = self.scaler.denormalize(result.action)
        req = self.req
        result.metadata["action"] = {
            "domain_name": req.domain_name,
            "domain_id": self.domain_id,
            "raw_action_dim": self.width,
            "action_space": "raw (denormalised with action_stats)" if self.scaler is not None else "normalized",
        }
        result.metadata.update(mode=req.mode, seed=req.seed, chunks=req.chunks, num_frames=int(result.video.shape[0]))
        result.metadata["computed_steps"] = sum(p.metadata["computed_steps"] for p in self.parts_done)
        return result


def prepare_chunk(
    parts: Parts,
    req: GenerateRequest,
    frames: list[Image.Image],
    actions: np.ndarray | None,
    domain_id: int,
    width: int,
    on_step=None,
) -> Denoising:
    """The conditioning clip on its canvas, the noise (the reference's draws, in its order) and packed prompts."""
    cfg = parts.transformer.config
    video = parts.video
    chunk = req.action_chunk_size
    pixels, (canvas_h, canvas_w), (content_h, content_w) = conditioning.action_canvas(
        frames, req.resolution, req.num_frames, video.spatial
    )
    x0 = video.encode(pixels)
    # The padding only served the encoder: the model sees the content area (rounded down to the VAE factor).
    x0 = x0[:, :, :, : max(content_h // video.spatial, 1), : max(content_w // video.spatial, 1)].contiguous()
    latent_frames = x0.shape[2]
    clean = list(range(latent_frames)) if req.mode == "inverse_dynamics" else [0]

    action_x0 = torch.zeros(chunk, cfg.action_dim)
    action_clean: list[int] = []
    if req.mode == "forward_dynamics":
        given = torch.from_numpy(actions)
        if given.shape[0] < chunk:  # short sequences repeat their last step, as the reference does
            given = torch.cat([given, given[-1:].expand(chunk - given.shape[0], -1)])
        action_x0[:, :width] = given[:chunk]
        action_clean = list(range(chunk))

    generator = torch.Generator("cpu").manual_seed(req.seed)
    noise = torch.randn(x0.shape, generator=generator).to(parts.device)
    latents = noise.clone()
    latents[:, :, clean] = x0[:, :, clean]
    action_noise = torch.randn((chunk, cfg.action_dim), generator=generator)  # drawn even when unused
    action_latents = action_noise.clone()
    action_latents[action_clean] = action_x0[action_clean]
    action_latents[:, width:] = 0

    packs = [
        pack(
            cfg,
            ids,
            tuple(x0.shape[2:]),
            clean,
            req.fps,
            video.temporal,
            action_len=chunk,
            action_clean_frames=action_clean,
            action_domain=domain_id,
            device=parts.device,
        )
        for ids in parts.prompt_ids(req, canvas_h, canvas_w)
    ]
    streams = [
        Stream("vision", latents, clean_frames=clean),
        Stream("action", action_latents.to(parts.device), clean_frames=action_clean, keep_channels=width),
    ]
    return Denoising(packs, streams, req, on_step)


def finish_chunk(parts: Parts, job: Denoising, width: int) -> GenerationResult:
    out = job.latents()
    action = None
    if job.req.mode in ("policy", "inverse_dynamics"):
        action = out["action"][:, :width].float().cpu().numpy()
    return GenerationResult(
        video=parts.video.decode(out["vision"]),
        fps=job.req.fps,
        latents=out["vision"],
        action=action,
        metadata={"computed_steps": job.computed_steps},
    )
