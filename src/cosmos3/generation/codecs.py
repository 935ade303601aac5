"""The VAE and the sound codec (diffusers' models) behind one small interface: normalised latents in and out."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cosmos3.generation.wan_decode import channels_last_weights, decode_chunks

# Latent frames a decode call takes at a time (4x temporal compression: 2 -> 8 video frames, the first chunk 5).
# Measured on an H200 at 720p x 189 frames with channels-last weights and fused norms
# (benchmarks/results/2026-12-02-h200-vae-chunked-b.log): 2 -> 6.66 s, peak 13.9 GiB; 4 -> 6.92 s, 20.1 GiB;
# 6 -> 6.84 s, 26.2 GiB (diffusers' per-frame decode: 9.39 s, 14.4 GiB). Wider chunks only cost memory.
DECODE_CHUNK_FRAMES = 2


class VideoCodec:
    """diffusers' `AutoencoderKLWan` with the checkpoint's latent normalisation; its factors come from its config.
    Decodes through `wan_decode.decode_chunks` (diffusers' modules, a few latent frames at a time) on a GPU."""

    def __init__(
        self,
        vae,
        latent_channels: int,
        chunk_frames: int = DECODE_CHUNK_FRAMES,
        chunked: bool | None = None,
        fused: bool | None = None,
    ):
        self.vae = vae
        self.latent_channels = latent_channels
        self.chunk_frames = chunk_frames
        # The chunked decode on a GPU, where it is faster. On a CPU (the tiny model) diffusers' per-frame decode:
        # oneDNN's results for the chunked decode's convolutions depend on the thread count in the last bits, and a
        # Ray actor (one thread) must write the same video as the process that checks it.
        cuda = self.device.type == "cuda"
        self.chunked = cuda if chunked is None else chunked
        # Norm + SiLU as one compiled kernel: on a GPU (where the passes cost; on a CPU Inductor's compile does).
        self.fused = cuda if fused is None else fused
        # Called after each decoded chunk (the server lends the GPU to a waiting chat there); None: nothing.
        self.between_chunks: Callable[[], None] | None = None
        self.spatial = int(vae.config.scale_factor_spatial)
        self.temporal = int(vae.config.scale_factor_temporal)
        # Stored in the VAE dtype, as the reference does (bf16-rounded with a bf16 VAE).
        self.mean = torch.tensor(vae.config.latents_mean, dtype=vae.dtype).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=vae.dtype).view(1, -1, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        frames = (num_frames - 1) // self.temporal + 1
        return (1, self.latent_channels, frames, height // self.spatial, width // self.spatial)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, F, H, W] in [-1, 1] -> normalised latents (fp32). Encoder mean, no sampling."""
        mu = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        return ((mu - self.mean.to(mu.device)) * self.inv_std.to(mu.device)).float()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 frames [T, H, W, 3]. Decoded `chunk_frames` latent frames at a time
        (`decode_chunks`), or by diffusers' `decode` (per frame, or tiled where tiling is on)."""
        raw = latents.to(self.vae.dtype) / self.inv_std.to(latents.device) + self.mean.to(latents.device)
        if self.vae.use_tiling or not self.chunked:
            channels_last_weights(self.vae, False)  # diffusers' layout (a chunked decode may have changed it)
            chunks = [self.vae.decode(raw).sample]
        else:
            chunks = decode_chunks(self.vae, raw, self.chunk_frames, self.between_chunks, self.fused)
        return np.concatenate([to_frames(pixels) for pixels in chunks])


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels [1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded as the reference's postprocess."""
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return (pixels[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()


class SoundCodec:
    """diffusers' `Cosmos3AVAEAudioTokenizer`: latent length for a clip, and latents -> waveform."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sample_rate = int(tokenizer.config.sampling_rate)

    def latent_length(self, num_frames: int, fps: float) -> int:
        samples = int(num_frames / fps * self.sample_rate)
        return math.ceil(samples / self.tokenizer._hop_size)

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """[channels, length] latents -> float32 [audio channels, samples]."""
        dtype = next(self.tokenizer.parameters()).dtype
        return self.tokenizer.decode(latent[None].to(dtype))[0].float().cpu().numpy()
