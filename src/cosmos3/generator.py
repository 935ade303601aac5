"""Generator modes -> packed sequences -> sampler -> decoded video, sound and actions."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosmos3 import conditioning, media, text
from cosmos3.guardrails import check_output, check_prompt
from cosmos3.request import GenerateRequest, RequestError
from cosmos3.sampler import Cancelled, Job, Stream, denoise_batch
from cosmos3.sequence import pack

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    video: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    latents: torch.Tensor  # final normalised vision latents [1, C, T, h, w], fp32
    sound: np.ndarray | None = None  # float32 [channels, samples]
    sample_rate: int | None = None
    action: np.ndarray | None = None  # float32 [steps, raw_action_dim]
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> list[Path]:
        """Write `.jpg`/`.png` (one frame) or `.mp4` (AAC muxed when there is sound); actions go to a `.json`
        beside it. Returns the paths written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix in (".jpg", ".jpeg", ".png"):
            if self.video.shape[0] != 1:
                raise RequestError("output", str(path), "a .mp4 path for a video", "is an image path")
            media.write_image(path, self.video[0])
        elif suffix == ".mp4":
            media.write_video(path, self.video, self.fps, self.sound, self.sample_rate)
        else:
            raise RequestError("output", str(path), ".mp4, .jpg, .jpeg or .png", "has an unsupported extension")
        written = [path]
        if self.action is not None:
            action_path = path.with_suffix(".json")
            action_path.write_text(json.dumps({"action": self.action.tolist(), **self.metadata.get("action", {})}))
            written.append(action_path)
        return written


class Generator:
    """Runs generation requests on loaded components (ours: transformer; diffusers: VAE, scheduler, audio)."""

    def __init__(
        self,
        transformer,
        vae,
        scheduler_config: dict,
        tokenizer,
        sound_tokenizer=None,
        default_use_system_prompt: bool = True,
        use_native_flow_schedule: bool = False,
        guardrail=None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.tokenizer = tokenizer
        self.sound_tokenizer = sound_tokenizer
        self.default_use_system_prompt = default_use_system_prompt
        self.use_native_flow_schedule = use_native_flow_schedule
        self.guardrail = guardrail  # cosmos3.guardrails.Guardrail or None
        self.last_computed_steps = 0  # model evaluations of the last request (fewer than steps with step_cache)
        self.spatial = int(vae.config.scale_factor_spatial)
        self.temporal = int(vae.config.scale_factor_temporal)
        # Stored in the VAE dtype, as the reference does (bf16-rounded with a bf16 VAE).
        self.latents_mean = torch.tensor(vae.config.latents_mean, dtype=vae.dtype)
        self.latents_inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=vae.dtype)

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_in.weight.device

    # ------------------------------------------------------------------ capabilities
    def check_supported(self, req: GenerateRequest) -> None:
        cfg = self.transformer.config
        for name in ("height", "width"):
            value = getattr(req, name)
            if value is not None and value % self.spatial:
                raise RequestError(name, value, f"a multiple of {self.spatial} (this VAE's spatial factor)")
        if req.enable_sound and (self.sound_tokenizer is None or not cfg.sound_gen):
            missing = "a sound_tokenizer" if self.sound_tokenizer is None else "a transformer trained with sound_gen"
            raise RequestError("enable_sound", True, "false for this checkpoint", f"needs {missing}")
        if req.is_action:
            if not cfg.action_gen:
                raise RequestError(
                    "mode",
                    req.mode,
                    "text2image, text2video, image2video, video2video",
                    "needs a checkpoint with the action tower (action_gen)",
                )
            if req.raw_action_dim > cfg.action_dim:
                raise RequestError(
                    "domain_name",
                    req.domain_name,
                    f"a domain with at most {cfg.action_dim} channels",
                    f"has {req.raw_action_dim} action channels, more than the model's",
                )

    # ------------------------------------------------------------------ VAE
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, F, H, W] in [-1, 1] -> normalised latents (fp32). Encoder mean, no sampling."""
        vae_dtype = self.vae.dtype
        mu = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist.mode()
        mean = self.latents_mean.to(mu.device).view(1, -1, 1, 1, 1)
        inv_std = self.latents_inv_std.to(mu.device).view(1, -1, 1, 1, 1)
        return ((mu - mean) * inv_std).float()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 frames [T, H, W, 3]."""
        vae_dtype = self.vae.dtype
        mean = self.latents_mean.to(latents.device).view(1, -1, 1, 1, 1)
        inv_std = self.latents_inv_std.to(latents.device).view(1, -1, 1, 1, 1)
        raw = latents.to(vae_dtype) / inv_std + mean
        pixels = self.vae.decode(raw).sample.float()  # [1, 3, F, H, W]
        pixels = (pixels / 2 + 0.5).clamp(0, 1)
        return (pixels[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()

    # ------------------------------------------------------------------ main entry
    def generate(
        self,
        req: GenerateRequest,
        progress: bool = True,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Run one resolved request (see `GenerateRequest.resolved`)."""
        self.check_supported(req)
        guardrail = self.guardrail if req.enable_safety_check else None
        check_prompt(guardrail, req.prompt)
        if req.is_action:
            from cosmos3.actions import generate_action

            result = generate_action(self, req, progress=progress, on_step=on_step)
        else:
            result = self.generate_vision(req, progress=progress, on_step=on_step)
        result.video = check_output(guardrail, result.video)  # sound and actions are not checked, as documented
        result.metadata["guardrails"] = guardrail is not None
        return result

    def prompt_ids(self, req: GenerateRequest, height: int, width: int) -> tuple[list[int], list[int]]:
        use_system = self.default_use_system_prompt if req.use_system_prompt is None else req.use_system_prompt
        system = (text.SYSTEM_PROMPT_IMAGE if req.num_frames == 1 else text.SYSTEM_PROMPT_VIDEO) if use_system else None
        negative = req.negative_prompt or ""
        if req.is_action:
            cond = text.action_caption(
                req.prompt,
                view_point=req.view_point,
                num_frames=req.num_frames,
                fps=req.fps,
                height=height,
                width=width,
            )
            uncond = negative
        else:
            meta = dict(
                num_frames=req.num_frames,
                height=height,
                width=width,
                fps=req.fps,
                duration_template=req.use_duration_template,
                resolution_template=req.use_resolution_template,
            )
            cond = text.with_metadata(req.prompt, negative=False, **meta)
            uncond = text.with_metadata(negative, negative=True, **meta)
        return (
            text.generation_input_ids(self.tokenizer, cond, system),
            text.generation_input_ids(self.tokenizer, uncond, system),
        )

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        c = self.transformer.config.latent_channel
        return (1, c, (num_frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial)

    def sound_length(self, num_frames: int, fps: float) -> int:
        samples = int(num_frames / fps * self.sound_tokenizer.config.sampling_rate)
        return math.ceil(samples / self.sound_tokenizer._hop_size)

    def prepare_vision(self, req: GenerateRequest, on_step=None) -> Job:
        """Conditioning, initial noise (the reference's draws, in its order) and packed prompts of a vision mode."""
        h, w, n = req.height, req.width, req.num_frames
        shape = self.latent_shape(n, h, w)
        clean: list[int] = []
        x0 = None
        if req.mode == "image2video":
            image = media.load_image(req.image, "image")
            x0 = self.encode(conditioning.image_to_video_pixels(image, n, h, w))
            clean = [0]
        elif req.mode == "video2video":
            frames, _ = media.load_video(req.video, "video")
            pixels = conditioning.video_to_video_pixels(
                frames, n, h, w, req.condition_frame_indexes_vision, req.condition_video_keep
            )
            x0 = self.encode(pixels)
            clean = sorted(set(req.condition_frame_indexes_vision))
        if n % self.temporal != 1 and n > 1:
            logger.warning("num_frames=%d is not 4k+1: the VAE keeps %d frames", n, (shape[2] - 1) * self.temporal + 1)

        generator = torch.Generator("cpu").manual_seed(req.seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        latents = noise
        if x0 is not None:
            latents = noise.clone()
            latents[:, :, clean] = x0[:, :, clean]
        streams = [Stream("vision", latents, clean_frames=clean)]
        sound_len = 0
        if req.enable_sound:
            sound_len = self.sound_length(n, req.fps)
            sound_noise = torch.randn((self.transformer.config.sound_dim, sound_len), generator=generator)
            streams.append(Stream("sound", sound_noise.to(self.device)))

        cond_ids, uncond_ids = self.prompt_ids(req, h, w)
        packs = [
            pack(
                self.transformer.config,
                ids,
                shape[2:],
                clean,
                req.fps,
                self.temporal,
                sound_len=sound_len,
                device=self.device,
            )
            for ids in (cond_ids, uncond_ids)
        ]
        return Job(packs, streams, req, on_step)

    def generate_vision(self, req: GenerateRequest, progress: bool, on_step) -> GenerationResult:
        job = self.prepare_vision(req, on_step)
        denoise_batch(self, [job], progress=progress)
        if job.cancelled:
            raise Cancelled(req.name)
        return self.finish_vision(job)

    def generate_batch(
        self, reqs: list[GenerateRequest], on_steps: list | None = None
    ) -> list[GenerationResult | None]:
        """Several text2image / text2video requests of one shape and schedule, denoised in shared passes (the
        server batches queued requests this way). A request cancelled on the way gets None; the others finish."""
        key = batch_key(reqs[0])
        if key is None or any(batch_key(r) != key for r in reqs):
            raise ValueError("generate_batch takes text2image / text2video requests of one shape and schedule")
        for req in reqs:
            self.check_supported(req)
        guardrails = [self.guardrail if r.enable_safety_check else None for r in reqs]
        for guardrail, req in zip(guardrails, reqs, strict=True):
            check_prompt(guardrail, req.prompt)
        jobs = [self.prepare_vision(r, cb) for r, cb in zip(reqs, on_steps or [None] * len(reqs), strict=True)]
        denoise_batch(self, jobs, progress=False)
        results: list[GenerationResult | None] = []
        for job, guardrail in zip(jobs, guardrails, strict=True):
            if job.cancelled:
                results.append(None)
                continue
            result = self.finish_vision(job)
            result.video = check_output(guardrail, result.video)
            result.metadata["guardrails"] = guardrail is not None
            results.append(result)
        return results

    def finish_vision(self, job: Job) -> GenerationResult:
        req = job.req
        out = {s.name: s.latents for s in job.streams}
        video = self.decode(out["vision"])
        result = GenerationResult(
            video=video,
            fps=req.fps,
            latents=out["vision"],
            metadata={
                "mode": req.mode,
                "seed": req.seed,
                "num_frames": video.shape[0],
                "computed_steps": self.last_computed_steps,
            },
        )
        if req.enable_sound:
            result.sound = self.decode_sound(out["sound"])
            result.sample_rate = int(self.sound_tokenizer.config.sampling_rate)
        return result

    def decode_sound(self, latent: torch.Tensor) -> np.ndarray:
        dtype = next(self.sound_tokenizer.parameters()).dtype
        wave = self.sound_tokenizer.decode(latent[None].to(dtype))[0]
        return wave.float().cpu().numpy()


def batch_key(req: GenerateRequest) -> tuple | None:
    """Requests with the same key can share denoising passes (`Generator.generate_batch`); None: never batched."""
    if req.mode not in ("text2image", "text2video") or req.step_cache is not None:
        return None
    return (req.mode, req.height, req.width, req.num_frames, req.fps, req.num_steps, req.shift, req.enable_sound)
