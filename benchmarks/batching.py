"""Several queued requests of one shape in shared passes vs one after the other (Nano, random bf16 weights).

One guided denoising step for N text2image 720p (or 256p text2video) requests: N calls of `forward_gen` with
2 branches each, against one call with 2N branches. Prints seconds per request-step and the speed-up.

    python benchmarks/batching.py --requests 4
    python benchmarks/batching.py --preset tiny --sizes tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
from common import SIZES, default_device, gpu_name, inputs, print_table, random_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=["t2i-720p", "256p"], choices=sorted(SIZES))
    args = parser.parse_args()
    device = default_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg, ours = random_model(args.preset, device)
    print(f"{gpu_name(device)}, torch {torch.__version__}, {args.requests} requests, one guided step")
    rows = []
    for size in args.sizes:
        requests = []
        for i in range(args.requests):
            cond, latent = inputs(cfg, size, device, seed=2 * i, dtype=torch.bfloat16)
            uncond, _ = inputs(cfg, size, device, prompt_tokens=120, seed=2 * i + 1)
            packs = [cond, uncond]
            requests.append((packs, [ours.und_cache(p) for p in packs], latent))
        t = torch.tensor(937, device=device)
        with torch.inference_mode():

            def one_by_one():
                for packs, caches, latent in requests:
                    ours.forward_gen(packs, caches, latent, t)

            def batched():
                ours.forward_gen(
                    [p for r in requests for p in r[0]],
                    [c for r in requests for c in r[1]],
                    [r[2] for r in requests for _ in r[0]],
                    t,
                )

            times = {}
            for name, fn in (("single", one_by_one), ("batched", batched)) * 2:  # second round counts
                sync()
                start = time.perf_counter()
                for _ in range(3):
                    fn()
                sync()
                times[name] = (time.perf_counter() - start) / 3 / args.requests
        single, shared = times["single"], times["batched"]
        rows.append([size, f"{single:.4f}", f"{shared:.4f}", f"{single / shared:.2f}x"])
    print_table(["size", "one at a time (s per request-step)", "batched (s per request-step)", "speed-up"], rows)


if __name__ == "__main__":
    main()
