"""The VAE and the sound codec (diffusers' models) behind one small interface: normalised latents in and out."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

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
        return frames_on_host(chunks, (latents.shape[2] - 1) * self.temporal + 1)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels [1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on their device, rounded as the reference's
    postprocess."""
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return (pixels[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8)


def frames_on_host(chunks: Iterable[torch.Tensor], frames: int) -> np.ndarray:
    """Decoded chunks of pixels (in order) -> uint8 frames [frames, H, W, 3] in host memory. On a GPU each chunk is
    copied into pinned memory behind its decode, without waiting, and moved into the result while the next chunk
    decodes: a plain `.cpu()` per chunk held the GPU idle for each copy and the final concatenation copied the whole
    video once more: 6.83-7.08 -> 6.53-6.55 s at 720p x 189 frames (benchmarks/README.md, "2026-12-03, late")."""
    out: np.ndarray | None = None
    start = 0
    pending: tuple[torch.Tensor, torch.cuda.Event, int] | None = None

    def land(frames_here: torch.Tensor, copied: torch.cuda.Event | None, at: int) -> None:
        if copied is not None:
            copied.synchronize()
        out[at : at + len(frames_here)] = frames_here.numpy()

    for pixels in chunks:
        chunk = to_uint8(pixels)
        if out is None:
            out = np.empty((frames, *chunk.shape[1:]), np.uint8)
        if start + len(chunk) > frames:
            raise RuntimeError(f"the decode gave more than the {frames} frames its latents have")
        if chunk.is_cuda:
            host = torch.empty(chunk.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(chunk, non_blocking=True)
            copied = torch.cuda.current_stream(chunk.device).record_event()
            if pending is not None:  # the previous chunk's copy is done by now or soon; this one's decode is queued
                land(*pending)
            pending = (host, copied, start)
        else:
            land(chunk, None, start)
        start += len(chunk)
    if pending is not None:
        land(*pending)
    if out is None or start != frames:
        raise RuntimeError(f"the decode gave {start} frames; its latents have {frames}")
    return out


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
