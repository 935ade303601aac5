"""The chunked, channels-last Wan decode (generation/wan_decode.py) against diffusers' `AutoencoderKLWan.decode`
with the same weights: both layouts (Wan2.2 residual with pixel patches, Wan2.1), several widths, chunk sizes and
clip lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from cosmos3.generation.codecs import VideoCodec
from cosmos3.generation.wan_decode import decode_chunks

Z = 16


def wan_vae(wan22: bool, wide: bool, seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    widths = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    if wide:  # the real checkpoints' shape: widths that change per level, a decoder wider than the encoder
        widths = dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
        if wan22:
            widths["decoder_base_dim"] = 24
    return AutoencoderKLWan(
        **widths,
        z_dim=Z,
        temperal_downsample=[False, True, True],
        is_residual=wan22,
        in_channels=12 if wan22 else 3,
        out_channels=12 if wan22 else 3,
        patch_size=2 if wan22 else None,
        scale_factor_spatial=16 if wan22 else 8,
        scale_factor_temporal=4,
        latents_mean=[0.0] * Z,
        latents_std=[1.0] * Z,
    ).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("wan22", [True, False], ids=["wan2.2", "wan2.1"])
@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
@pytest.mark.parametrize("frames", [1, 2, 6])
def test_chunked_decode_equals_diffusers_in_fp32(wan22, wide, frames):
    vae = wan_vae(wan22, wide)
    z = torch.randn(1, Z, frames, 3, 5, generator=torch.Generator().manual_seed(frames))
    with torch.inference_mode():
        reference = vae.decode(z).sample
        for chunk in (1, 2, 3, 7):
            pieces = list(decode_chunks(vae, z, chunk))
            assert len(pieces) == -(-frames // chunk)
            out = torch.cat(pieces, dim=2)
            assert out.shape == reference.shape
            assert rel(out, reference) < 1e-5, (chunk, rel(out, reference))


def test_chunked_decode_in_bf16_is_as_close_to_fp32_as_diffusers_bf16():
    vae = wan_vae(True, True)
    z = torch.randn(1, Z, 6, 3, 4, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact = vae.decode(z).sample
        vae = vae.to(torch.bfloat16)
        reference = vae.decode(z.bfloat16()).sample
        ours = torch.cat(list(decode_chunks(vae, z.bfloat16(), 2)), dim=2)
    assert ours.dtype == torch.bfloat16
    assert rel(reference, exact) > 1e-3  # bf16 rounding is visible, so the comparison below means something
    assert rel(ours, exact) < 1.25 * rel(reference, exact)


def test_codec_decodes_in_chunks_yields_between_them_and_matches_diffusers_frames():
    vae = wan_vae(True, False)
    codec = VideoCodec(vae, Z, chunk_frames=2, chunked=True)
    latents = torch.randn(1, Z, 5, 2, 3, generator=torch.Generator().manual_seed(2))
    calls = []
    codec.between_chunks = lambda: calls.append(1)
    with torch.inference_mode():
        frames = codec.decode(latents)
        pixels = vae.decode(latents / codec.inv_std + codec.mean).sample
    expected = ((pixels[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert frames.dtype == np.uint8 and frames.shape == expected.shape == (17, 32, 48, 3)
    assert len(calls) == 3  # latent frames [0, 1], [2, 3], [4]
    difference = np.abs(frames.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # fp32 noise may cross a rounding edge


def test_codec_on_a_cpu_decodes_as_diffusers_per_frame_whatever_the_thread_count():
    vae = wan_vae(True, False)
    codec = VideoCodec(vae, Z)
    assert not codec.chunked and not codec.fused
    codec.between_chunks = lambda: pytest.fail("diffusers' decode has no chunks")
    latents = torch.randn(1, Z, 3, 2, 3, generator=torch.Generator().manual_seed(6))
    threads, frames = torch.get_num_threads(), []
    try:
        with torch.inference_mode():
            for count in (1, 2):  # a Ray actor runs one thread; the process that checks its video more
                torch.set_num_threads(count)
                frames.append(codec.decode(latents))
            pixels = vae.decode(latents / codec.inv_std + codec.mean).sample
    finally:
        torch.set_num_threads(threads)
    expected = ((pixels[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(frames[0], expected) and np.array_equal(frames[1], expected)


def test_codec_with_tiling_decodes_with_diffusers_tiles():
    vae = wan_vae(True, False)
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)  # fmt: skip
    codec = VideoCodec(vae, Z, chunked=True)
    codec.between_chunks = lambda: pytest.fail("the tiled decode is diffusers' own: no chunks")
    latents = torch.randn(1, Z, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        frames = codec.decode(latents)
        pixels = vae.tiled_decode(latents / codec.inv_std + codec.mean).sample
    expected = ((pixels[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(frames, expected)


def test_chunk_size_below_one_is_an_error():
    with pytest.raises(ValueError, match="chunk_frames=0"):
        next(decode_chunks(wan_vae(True, False), torch.zeros(1, Z, 1, 2, 2), 0))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("first_chunk", [True, False])
@pytest.mark.parametrize(
    ("c_in", "c_out", "factor_t", "frames"),
    [
        (8, 8, 2, 3),  # repeats = F: a broadcast of each skip channel (Wan2.2's first two up blocks)
        (8, 4, 2, 3),  # F / 2: the time sub-position from the channels
        (8, 4, 1, 3),  # F / 2 without temporal upsampling: the row from the channels (Wan2.2's third)
        (32, 4, 2, 2),  # 1: every sub-position from the channels
        (6, 12, 2, 1),  # 2 F: two output channels per skip channel; one frame
        (16, 6, 2, 2),  # 3: no whole axis, the repeated copy
    ],
)
def test_dup_up_add_is_x_plus_diffusers_dup_up(first_chunk, c_in, c_out, factor_t, frames):
    from diffusers.models.autoencoders.autoencoder_kl_wan import DupUp3D

    from cosmos3.generation.wan_decode import dup_up_add

    dup = DupUp3D(c_in, c_out, factor_t=factor_t, factor_s=2)
    skip = channels_last(torch.randn(1, c_in, frames, 4, 5))
    expected = dup(skip, first_chunk=first_chunk)
    x = channels_last(torch.randn(expected.shape))
    reference = x + expected
    out = dup_up_add(x, skip, c_out, factor_t, 2, first_chunk)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out, reference)


def test_fused_kernels_round_as_the_eager_modules():
    """The compiled norm + SiLU (what a GPU decode runs, on the GPU where there is one) against diffusers' modules,
    in bf16: one bf16 rounding step apart at most (fp32 norms summed in another order). On a CPU, Inductor's C++
    kernel stands in; on one with AVX512-BF16 / AMX (an H200 host's Xeon) it keeps a product unrounded that eager
    rounds, and lands up to two steps apart (measured 1.37), so the CPU is held to two."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from cosmos3.generation.wan_decode import compiled, rms_silu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    norm = WanRMS_norm(16, images=False)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    x = channels_last(torch.randn(1, 16, 3, 4, 6)).to(device, torch.bfloat16)
    with torch.inference_mode():
        norm = norm.to(device, torch.bfloat16)
        expected = torch.nn.functional.silu(norm(x))
        assert torch.equal(rms_silu(x, norm.gamma.view(-1)), expected)
        fused = compiled(rms_silu)(x, norm.gamma.view(-1))
        ulp = (fused.float() - expected.float()).abs() / expected.float().abs().clamp_min(1e-3)
        assert ulp.max() <= (2**-7 if device == "cuda" else 2**-6), ulp.max()


@pytest.mark.parametrize("wan22", [True, False], ids=["wan2.2", "wan2.1"])
def test_chunked_decode_with_one_temporal_upsample(wan22):
    """A VAE that compresses time 2x (one temporal up block of three) and has a mid-block attention per frame."""
    torch.manual_seed(4)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, False, True],
        is_residual=wan22, in_channels=12 if wan22 else 3, out_channels=12 if wan22 else 3,
        patch_size=2 if wan22 else None, scale_factor_temporal=2, latents_mean=[0.0] * Z, latents_std=[1.0] * Z,
    ).eval()  # fmt: skip
    z = torch.randn(1, Z, 5, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = vae.decode(z).sample
        out = torch.cat(list(decode_chunks(vae, z, 2)), dim=2)
    assert out.shape == reference.shape and out.shape[2] == 9
    assert rel(out, reference) < 1e-5


def chunks_of(pixels: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(pixels, sizes, dim=2))


def test_frames_on_host_lays_chunks_in_order_and_checks_their_count():
    from cosmos3.generation.codecs import frames_on_host, to_uint8

    pixels = torch.rand(1, 3, 9, 4, 6) * 2.2 - 1.1  # past [-1, 1] as well: clamped
    expected = to_uint8(pixels).numpy()
    assert np.array_equal(frames_on_host(chunks_of(pixels, [1, 4, 4]), 9), expected)
    assert frames_on_host(chunks_of(pixels, [1, 4, 4]), 9).flags.c_contiguous
    with pytest.raises(RuntimeError, match="gave 5 frames; its latents have 9"):
        frames_on_host(chunks_of(pixels[:, :, :5], [1, 4]), 9)
    with pytest.raises(RuntimeError, match="more than the 5 frames"):
        frames_on_host(chunks_of(pixels, [1, 4, 4]), 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the overlapped copies to pinned memory need a GPU")
def test_frames_on_host_from_a_gpu_equals_the_plain_copy():
    from cosmos3.generation.codecs import frames_on_host, to_uint8

    pixels = torch.rand(1, 3, 21, 72, 128, device="cuda") * 2 - 1
    expected = to_uint8(pixels).cpu().numpy()
    for _ in range(3):  # pinned blocks come back from torch's host cache on later calls
        sizes = [1] + [4] * 5
        chunks = (chunk.clone() * 1.0 for chunk in chunks_of(pixels, sizes))  # made as the copies run
        assert np.array_equal(frames_on_host(chunks, 21), expected)
