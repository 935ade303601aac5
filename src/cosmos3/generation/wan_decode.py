"""The Wan VAE's decoder run in time chunks, channels-last, over diffusers' own modules and weights.

diffusers' `AutoencoderKLWan._decode` calls its decoder once per latent frame. Each causal 3-D convolution then
concatenates the two cached frames before its input and pads the result spatially (two full copies of every
convolution's input), cuDNN transposes NCDHW activations to its channels-last layout and back around every
convolution, and the low-resolution levels are bound by kernel launches. Profiled on an H200 at 720p x 189 frames
(benchmarks/results/2026-12-02-h200-vae-profile.log): copies ~25% and layout transposes ~9% of the decode's GPU time.

Here the same modules run on several latent frames at a time with activations in `torch.channels_last_3d`; each
convolution pads spatially inside cuDNN, and only the temporal cache is concatenated. The arithmetic is the
reference's: every causal convolution sees the same frames (the last `kernel - 1` frames of its input sequence
before the chunk, zeros before the first), the norms, activations, attention and shortcuts are diffusers' modules
called as they are, and the first latent frame keeps its special case (no temporal upsampling, see
`WanResample`). Differences are those of a convolution algorithm choice (bf16 rounding order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # diffusers is imported by whoever built the VAE; importing cosmos3 stays light
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

CHANNELS_LAST = torch.channels_last_3d


class CausalCache(dict):
    """Each causal convolution's last `kernel - 1` input frames (the reference's `feat_cache`), by module. A
    convolution that has none yet sees zeros before its input: the reference's causal padding."""


def causal_conv(conv: wan.WanCausalConv3d, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """`conv` over `x` (a chunk of its input sequence), temporally causal across chunks."""
    pad_w, _, pad_h, _, pad_t, _ = conv._padding  # (left, right, top, bottom, front, back) of F.pad
    if pad_t:
        previous = cache.get(conv)
        if previous is None:
            previous = x.new_zeros((*x.shape[:2], pad_t, *x.shape[3:])).contiguous(memory_format=CHANNELS_LAST)
        x = torch.cat([previous, x], dim=2)
        cache[conv] = x[:, :, -pad_t:].clone()  # a clone: a view would keep the whole input alive
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, pad_h, pad_w))


def residual_block(block: wan.WanResidualBlock, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    shortcut = x if isinstance(block.conv_shortcut, nn.Identity) else causal_conv(block.conv_shortcut, x, cache)
    x = causal_conv(block.conv1, block.nonlinearity(block.norm1(x)), cache)
    x = causal_conv(block.conv2, block.nonlinearity(block.norm2(x)), cache)  # dropout: identity in eval
    return x + shortcut


def spatial(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A per-frame 2-D module over [B, C, T, H, W]; in channels-last memory both reshapes are views."""
    b, _, t = x.shape[:3]
    y = module(x.permute(0, 2, 1, 3, 4).reshape(b * t, *x.shape[1:2], *x.shape[3:]))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """`WanUpsample`: nearest-exact 2x (the reference casts to fp32 and back: nearest copies values, so the bf16
    result is the same)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def resample(block: wan.WanResample, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
    """`WanResample` for decoding ('upsample2d' / 'upsample3d'). Temporal upsampling doubles every latent frame but
    the video's first, whose frame is passed on as it is; the time convolution's sequence starts at the second."""
    if block.mode not in ("upsample2d", "upsample3d"):
        raise ValueError(f"decoding has no resample mode {block.mode!r}")
    if block.mode == "upsample3d":
        head, x = (x[:, :, :1], x[:, :, 1:]) if first_chunk else (None, x)
        if x.shape[2]:
            b, c, t, h, w = x.shape
            x = causal_conv(block.time_conv, x, cache)  # [B, 2C, T, H, W]: channels (s, c) are frame 2t + s
            x = x.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)
            x = x.reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)  # one copy, channels-last
        x = x if head is None else torch.cat([head, x], dim=2) if x.shape[2] else head
    upsample, conv = block.resample
    if upsample.mode != "nearest-exact" or tuple(upsample.scale_factor) != (2.0, 2.0):
        raise ValueError(f"decoding expects a nearest-exact 2x upsample, not {upsample}")
    return spatial(conv, spatial(upsample_2x, x))


def dup_up(block: wan.DupUp3D, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
    return block(x, first_chunk=first_chunk).contiguous(memory_format=CHANNELS_LAST)


def up_block(block: nn.Module, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
    """`WanResidualUpBlock` (Wan2.2) or `WanUpBlock` (Wan2.1)."""
    skip = x
    for resnet in block.resnets:
        x = residual_block(resnet, x, cache)
    if hasattr(block, "avg_shortcut"):  # WanResidualUpBlock
        if block.upsampler is not None:
            x = resample(block.upsampler, x, cache, first_chunk)
        if block.avg_shortcut is not None:
            x = x + dup_up(block.avg_shortcut, skip, first_chunk)
        return x
    if block.upsamplers is not None:
        x = resample(block.upsamplers[0], x, cache, first_chunk)
    return x


def decoder_chunk(decoder: wan.WanDecoder3d, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
    """`WanDecoder3d.forward` on a chunk of latent frames."""
    x = causal_conv(decoder.conv_in, x, cache)
    mid = decoder.mid_block
    x = residual_block(mid.resnets[0], x, cache)
    for attention, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        x = residual_block(resnet, attention(x).contiguous(memory_format=CHANNELS_LAST), cache)
    for block in decoder.up_blocks:
        x = up_block(block, x, cache, first_chunk)
    return causal_conv(decoder.conv_out, decoder.nonlinearity(decoder.norm_out(x)), cache)


def decode_chunks(
    vae: wan.AutoencoderKLWan, z: torch.Tensor, chunk_frames: int, between_chunks: Callable[[], None] | None = None
) -> Iterator[torch.Tensor]:
    """Raw latents [B, C, T, h, w] -> the decoded pixels of `chunk_frames` latent frames at a time, clamped to [-1, 1]
    as `AutoencoderKLWan.decode`'s (its frames in order; the first chunk has 4 (chunk_frames - 1) + 1 frames)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    if chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames} is not allowed; allowed: >= 1")
    x = causal_conv(vae.post_quant_conv, z.contiguous(memory_format=CHANNELS_LAST), CausalCache())
    cache = CausalCache()
    for start in range(0, x.shape[2], chunk_frames):
        out = decoder_chunk(vae.decoder, x[:, :, start : start + chunk_frames], cache, first_chunk=start == 0)
        out = out.contiguous()
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        yield out.clamp(-1.0, 1.0)
        if between_chunks is not None:
            between_chunks()
