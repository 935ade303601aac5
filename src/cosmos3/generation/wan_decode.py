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

import functools
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
    convolution that has none yet sees zeros before its input: the reference's causal padding. `fused`: the norms
    and their activations run as one compiled kernel (`norm_silu`)."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused


def rms_silu(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """`WanRMS_norm` (no bias) then SiLU, as diffusers rounds them: normalised in fp32, scaled in the input dtype.
    `gamma`: [C], a plain tensor (dynamo keeps parameters' sizes static: one graph per width); the scale,
    sqrt(C), comes from the shape for the same reason."""
    return F.silu(F.normalize(x.float(), dim=1).to(x.dtype) * x.shape[1] ** 0.5 * gamma.view(-1, 1, 1, 1))


def dup_up_add(
    x: torch.Tensor, skip: torch.Tensor, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool
) -> torch.Tensor:
    """`x + DupUp3D(skip)` on channels-last tensors: each channel of `skip` repeated, the repeats spread over
    (time, height, width) sub-positions in `DupUp3D`'s order, the first frame's extra time repeats dropped. Added
    into `x` in place (x is a fresh activation) as a broadcast of `skip`, one pass over `x` without materialising
    the repeated `skip`, where the repeats line up with whole sub-position axes (every Wan VAE); else through the
    repeated copy, as `DupUp3D` does."""
    b, c, t, h, w = skip.shape
    k = factor_t * factor_s * factor_s  # sub-positions per input position, in (time, height, width) order
    repeats = out_channels * k // c  # output (channel, sub-position) pair j reads skip channel j // repeats
    sub = skip.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]; a view of a channels-last tensor
    # repeats < k: the leading sub-position axes come from skip's channels, the trailing `repeats` broadcast
    leading = {
        factor_s * factor_s: (factor_t, 1, 1),
        factor_s: (factor_t, factor_s, 1),
        1: (factor_t, factor_s, factor_s),
    }
    if repeats % k == 0:  # one skip channel per output channel, broadcast over its sub-positions
        view = sub[:, :, None, :, None, :, None, :, None]  # [B, T, 1, H, 1, W, 1, C, 1]
        target = (b, t, factor_t, h, factor_s, w, factor_s, c, repeats // k)
    elif repeats in leading:
        ft, fh, fw = leading[repeats]
        view = sub.reshape(b, t, h, w, out_channels, ft, fh, fw).permute(0, 1, 5, 2, 6, 3, 7, 4)
        target = (b, t, factor_t, h, factor_s, w, factor_s, out_channels)
    else:
        y = sub.repeat_interleave(repeats, dim=-1)  # [B, T, H, W, C * repeats]
        y = y.view(b, t, h, w, out_channels, factor_t, factor_s, factor_s).permute(0, 1, 5, 2, 6, 3, 7, 4)
        y = y.reshape(b, t * factor_t, h * factor_s, w * factor_s, out_channels)
        if first_chunk:
            y = y[:, factor_t - 1 :]
        return x + y.permute(0, 4, 1, 2, 3)
    out = x.permute(0, 2, 3, 4, 1)  # [B, T', H', W', C_out], a view: the adds below write into x
    if first_chunk:  # frame 0 keeps only its last time sub-position
        out[:, :1].view(b, 1, 1, h, factor_s, w, factor_s, *target[7:]).add_(view[:, :1, -1:])
        out, view, t = out[:, 1:], view[:, 1:], t - 1
    out.view(b, t, *target[2:]).add_(view)
    return x


@functools.cache
def compiled(fn: Callable) -> Callable:
    # Eager runs the norm as ~6 passes over the activation (fp32 copy, norm, divide, cast, two scales) and SiLU as
    # one more; Inductor fuses them into one pass, keeping eager's roundings. Dynamic shapes: a graph serves every
    # size. Only the norm is compiled: measured on an H200 in fresh processes (720p, 6 latent frames;
    # benchmarks/results/2026-12-03-h200-vae-compile-variants.log), compiling it costs ~10 s once and takes the
    # decode from 0.87 to 0.80 s; compiling the shortcut (`dup_up_add`) as well cost 60 s more (dynamic 8-D views)
    # and bought nothing (0.81 s).
    return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})


def norm_silu(norm: wan.WanRMS_norm, activation: nn.Module, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    fusable = isinstance(activation, nn.SiLU) and not isinstance(norm.bias, nn.Parameter)
    if cache.fused and fusable:
        return compiled(rms_silu)(x, norm.gamma.detach().view(-1))
    return activation(norm(x))


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
    x = causal_conv(block.conv1, norm_silu(block.norm1, block.nonlinearity, x, cache), cache)
    x = causal_conv(block.conv2, norm_silu(block.norm2, block.nonlinearity, x, cache), cache)  # dropout: eval
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


def up_block(block: nn.Module, x: torch.Tensor, cache: CausalCache, first_chunk: bool) -> torch.Tensor:
    """`WanResidualUpBlock` (Wan2.2) or `WanUpBlock` (Wan2.1)."""
    skip = x
    for resnet in block.resnets:
        x = residual_block(resnet, x, cache)
    if hasattr(block, "avg_shortcut"):  # WanResidualUpBlock
        if block.upsampler is not None:
            x = resample(block.upsampler, x, cache, first_chunk)
        if block.avg_shortcut is not None:
            dup = block.avg_shortcut
            x = dup_up_add(x, skip, dup.out_channels, dup.factor_t, dup.factor_s, first_chunk)
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
    return causal_conv(decoder.conv_out, norm_silu(decoder.norm_out, decoder.nonlinearity, x, cache), cache)


def channels_last_weights(vae: wan.AutoencoderKLWan, channels_last: bool = True) -> None:
    """The decoder's convolution weights in channels-last memory (or back), in place; the encoder's stay as they
    are; a no-op where they already are. With channels-last activations and NCDHW weights cuDNN transposes the
    weights and its output on every call: measured on an H200 at 720p, 9.56 -> 8.34 s a decode
    (benchmarks/results/2026-12-02-h200-vae-chunked.log)."""
    for module in (vae.post_quant_conv, *vae.decoder.modules()):
        if isinstance(module, nn.Conv3d | nn.Conv2d):
            layout = CHANNELS_LAST if module.weight.dim() == 5 else torch.channels_last
            layout = layout if channels_last else torch.contiguous_format
            module.weight.data = module.weight.data.contiguous(memory_format=layout)


def decode_chunks(
    vae: wan.AutoencoderKLWan,
    z: torch.Tensor,
    chunk_frames: int,
    between_chunks: Callable[[], None] | None = None,
    fused: bool = False,
) -> Iterator[torch.Tensor]:
    """Raw latents [B, C, T, h, w] -> the decoded pixels of `chunk_frames` latent frames at a time, clamped to [-1, 1]
    as `AutoencoderKLWan.decode`'s (its frames in order; the first chunk has 4 (chunk_frames - 1) + 1 frames).
    `fused`: norms and activations compiled into one kernel each (torch.compile; the first call compiles)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    if chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames} is not allowed; allowed: >= 1")
    channels_last_weights(vae)
    x = causal_conv(vae.post_quant_conv, z.contiguous(memory_format=CHANNELS_LAST), CausalCache())
    cache = CausalCache(fused)
    for start in range(0, x.shape[2], chunk_frames):
        out = decoder_chunk(vae.decoder, x[:, :, start : start + chunk_frames], cache, first_chunk=start == 0)
        out = out.contiguous()
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        yield out.clamp(-1.0, 1.0)
        if between_chunks is not None:
            between_chunks()
