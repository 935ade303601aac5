"""VAE decode of a clip: diffusers' `AutoencoderKLWan.decode` under the settings that change its speed (cuDNN
autotuning, channels-last 3D weights, torch.compile of the decoder: last, it stays compiled) and cosmos3's chunked
channels-last decode (generation/wan_decode.py) at several chunk sizes. Seconds, peak memory and the difference from
diffusers' default.

    python benchmarks/vae_decode.py --size 720p
    python benchmarks/vae_decode.py --preset tiny --size tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from common import SIZES, default_device, gpu_name, latent_shape, print_table, timed, wan22_vae

from cosmos3.config import preset
from cosmos3.generation.wan_decode import decode_chunks


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def profile(decode, device: torch.device, top: int = 20) -> None:
    """Where a decode's GPU time goes: the top kernels, and their share."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode():
        decode()  # warm-up
        with torch.profiler.profile(activities=activities) as prof:
            decode()
            if device.type == "cuda":
                torch.cuda.synchronize()
    cuda = device.type == "cuda"
    kernels = [
        (e.device_time_total if cuda else e.self_cpu_time_total, e.count, e.key)
        for e in prof.key_averages()
        if not cuda or e.device_type == torch.autograd.DeviceType.CUDA
    ]
    kernels = sorted((k for k in kernels if k[0] > 0), reverse=True)
    whole = sum(k[0] for k in kernels) or 1.0
    print(f"one decode: {whole / 1e6:.2f} s of {'GPU' if cuda else 'CPU'} time")
    print_table(
        ["kernel", "calls", "ms", "share"],
        [[k[:100], n, f"{us / 1e3:.1f}", f"{us / whole:.1%}"] for us, n, k in kernels[:top]],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano", help="the VAE's latent channels; tiny: a tiny VAE")
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or all")
    parser.add_argument("--profile", default="", help="first print the top GPU kernels of one decode of this variant")
    args = parser.parse_args()
    device = default_device()
    channels = preset(args.preset).latent_channel
    vae = wan22_vae(device, channels, full=args.preset != "tiny")
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, channels, *latent_shape(args.size), device=device, dtype=torch.bfloat16, generator=gen)

    def diffusers_decode():
        return vae.decode(latents).sample.float()

    def chunked(frames: int, fused: bool = False):
        return lambda: torch.cat(list(decode_chunks(vae, latents, frames, fused=fused)), dim=2).float()

    # name: (decode, cudnn.benchmark, channels-last weights, torch.compile the decoder)
    variants = {
        "default": (diffusers_decode, False, False, False),
        "cudnn.benchmark": (diffusers_decode, True, False, False),
        "channels_last_3d": (diffusers_decode, False, True, False),
        "cudnn.benchmark + channels_last_3d": (diffusers_decode, True, True, False),
        # cosmos3's decode (generation/wan_decode.py): N latent frames a call, activations channels-last
        **{f"chunked {n}": (chunked(n), False, False, False) for n in (1, 2, 4)},
        "chunked 2 + channels_last_3d": (chunked(2), False, True, False),
        # norm + SiLU compiled into one kernel (the warm-up compiles)
        **{f"chunked {n} fused": (chunked(n, fused=True), False, False, False) for n in (2, 4)},
        # as VideoCodec runs it: channels-last weights, fused norms on a GPU
        **{f"cosmos3 {n}": (chunked(n, fused=device.type == "cuda"), False, True, False) for n in (2, 4, 6)},
        # The decoder torch.compiled whole (its per-frame cache is a list it mutates: dynamo replays that); the
        # first call compiles (the warm-up, not timed). Last: it stays compiled.
        "compile": (diffusers_decode, False, False, True),
    }
    if args.variants != "all":
        variants = {"default": variants["default"]} | {k: variants[k] for k in args.variants.split(",")}
    rows, reference = [], None
    if args.profile:
        profile(variants[args.profile][0], device)
    with torch.inference_mode():
        for name, (decode, bench, channels_last, compile_decoder) in variants.items():
            for p in vae.parameters():  # only the conv weights have a channels-last layout
                if p.dim() in (4, 5):
                    layout = {4: torch.channels_last, 5: torch.channels_last_3d}[p.dim()]
                    p.data = p.data.contiguous(memory_format=layout if channels_last else torch.contiguous_format)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if compile_decoder:
                vae.decoder = torch.compile(vae.decoder)
            with cudnn_benchmark(bench):
                start = time.perf_counter()
                decode()  # the first call: compiles where a variant compiles
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - start
                seconds, peak, out = timed(decode, repeat=args.repeat)
            out = out.cpu()
            reference = out if reference is None else reference
            err = ((out - reference).norm() / reference.norm()).item()
            rows.append([name, f"{seconds:.2f}", f"{first:.1f}", f"{peak:.1f}", f"{err:.2g}"])
            print(rows[-1], flush=True)
    frames, height, width = SIZES[args.size]
    print(f"{gpu_name(device)}, torch {torch.__version__}: {args.size} ({width}x{height}) x {frames} frames decode")
    print_table(["VAE decode", "seconds", "first call s", "peak GiB", "rel. diff vs default"], rows)


if __name__ == "__main__":
    main()
