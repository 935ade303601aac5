"""VAE decode of a 720p, 189-frame clip with and without tiling: seconds, peak memory, and the difference.

python benchmarks/vae_tiling.py
"""

from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from pipeline import wan22_vae  # noqa: E402


def main() -> None:
    vae = wan22_vae()
    latents = torch.randn(
        1, 48, 48, 45, 80, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0)
    )
    results = {}
    with torch.inference_mode():
        for tiled in (False, True):
            vae.enable_tiling() if tiled else vae.disable_tiling()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = vae.decode(latents).sample.float()
            torch.cuda.synchronize()
            results[tiled] = (time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30, out.cpu())
    (t0, m0, a), (t1, m1, b) = results[False], results[True]
    err = ((a - b).norm() / a.norm()).item()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: 720p x 189 frames decode")
    print("| VAE decode | seconds | peak GiB |\n| --- | ---: | ---: |")
    print(f"| whole | {t0:.2f} | {m0:.1f} |\n| tiled | {t1:.2f} | {m1:.1f} |")
    print(f"relative difference of the frames, tiled vs whole: {err:.3g}")


if __name__ == "__main__":
    main()
