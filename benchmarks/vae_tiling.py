"""VAE decode of a 720p, 189-frame clip with and without tiling: seconds, peak memory, and the difference.

python benchmarks/vae_tiling.py
python benchmarks/vae_tiling.py --preset tiny --size tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse

import torch
from common import SIZES, default_device, gpu_name, latent_shape, print_table, timed, wan22_vae

from cosmos3.config import preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano", help="the VAE's latent channels; tiny: a tiny VAE")
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    args = parser.parse_args()
    device = default_device()
    channels = preset(args.preset).latent_channel
    vae = wan22_vae(device, channels, full=args.preset != "tiny")
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, channels, *latent_shape(args.size), device=device, dtype=torch.bfloat16, generator=gen)
    results = {}
    with torch.inference_mode():
        for tiled in (False, True):
            vae.enable_tiling() if tiled else vae.disable_tiling()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            seconds, peak, out = timed(lambda: vae.decode(latents).sample.float(), repeat=1)
            results[tiled] = (seconds, peak, out.cpu())
    (t0, m0, a), (t1, m1, b) = results[False], results[True]
    err = ((a - b).norm() / a.norm()).item()
    frames, height, width = SIZES[args.size]
    print(f"{gpu_name(device)}, torch {torch.__version__}: {args.size} ({width}x{height}) x {frames} frames decode")
    print_table(
        ["VAE decode", "seconds", "peak GiB"],
        [["whole", f"{t0:.2f}", f"{m0:.1f}"], ["tiled", f"{t1:.2f}", f"{m1:.1f}"]],
    )
    print(f"relative difference of the frames, tiled vs whole: {err:.3g}")


if __name__ == "__main__":
    main()
