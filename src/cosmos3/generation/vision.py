"""The vision modes (text2image, text2video, image2video, video2video), each optionally with sound:
request -> conditioning, noise and packed prompts (`prepare`) -> final latents -> frames and sound (`finish`)."""

from __future__ import annotations

import logging

import torch

from cosmos3 import media
from cosmos3.generation import conditioning
from cosmos3.generation.parts import Parts
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.result import GenerationResult
from cosmos3.generation.sampler import Denoising, Stream
from cosmos3.model.sequence import pack

logger = logging.getLogger(__name__)


def prepare(parts: Parts, req: GenerateRequest, on_step=None) -> Denoising:
    """Conditioning, initial noise (the reference's draws, in its order) and packed prompts of a vision mode."""
    video = parts.video
    h, w, n = req.height, req.width, req.num_frames
    shape = video.latent_shape(n, h, w)
    clean: list[int] = []
    x0 = None
    # Only the clean latent frames of x0 are used, and the VAE encoder is causal in time (latent frame k sees pixel
    # frames up to temporal * k; diffusers encodes frame 0 alone, then `temporal` frames at a time): so only the
    # pixel frames up to the last clean one are encoded. The reference encodes the whole clip (image2video: the
    # image repeated over every frame) and gets the same clean latents; at 720p x 189 frames that encode is ~4 s.
    if req.mode == "image2video":
        image = media.load_image(req.image, "image")
        x0 = video.encode(conditioning.image_to_video_pixels(image, 1, h, w))
        clean = [0]
    elif req.mode == "video2video":
        frames, _ = media.load_video(req.video, "video")
        clean = sorted(set(req.condition_frame_indexes_vision))
        covered = min(n, clean[-1] * video.temporal + 1)
        pixels = conditioning.video_to_video_pixels(
            frames, covered, h, w, req.condition_frame_indexes_vision, req.condition_video_keep, video.temporal
        )
        x0 = video.encode(pixels)
    if n % video.temporal != 1 and n > 1:
        logger.warning(
            "num_frames=%d is not %dk+1: the VAE keeps %d frames",
            n,
            video.temporal,
            (shape[2] - 1) * video.temporal + 1,
        )

    generator = torch.Generator("cpu").manual_seed(req.seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(parts.device)
    latents = noise
    if x0 is not None:
        latents = noise.clone()
        latents[:, :, clean] = x0[:, :, clean]
    streams = [Stream("vision", latents, clean_frames=clean)]
    sound_len = 0
    if req.enable_sound:
        sound_len = parts.sound.latent_length(n, req.fps)
        sound_noise = torch.randn((parts.transformer.config.sound_dim, sound_len), generator=generator)
        streams.append(Stream("sound", sound_noise.to(parts.device)))

    packs = [
        pack(
            parts.transformer.config,
            ids,
            shape[2:],
            clean,
            req.fps,
            video.temporal,
            sound_len=sound_len,
            device=parts.device,
        )
        for ids in parts.prompt_ids(req, h, w)
    ]
    return Denoising(packs, streams, req, on_step)


def finish(parts: Parts, job: Denoising) -> GenerationResult:
    req = job.req
    out = job.latents()
    frames = parts.video.decode(out["vision"])
    result = GenerationResult(
        video=frames,
        fps=req.fps,
        latents=out["vision"],
        metadata={
            "mode": req.mode,
            "seed": req.seed,
            "num_frames": frames.shape[0],
            "computed_steps": job.computed_steps,
        },
    )
    if req.enable_sound:
        result.sound = parts.sound.decode(out["sound"])
        result.sample_rate = parts.sound.sample_rate
    return result
