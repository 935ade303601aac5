"""Several queued requests of one shape in shared passes vs one after the other (Nano, random bf16 weights).

One guided denoising step for N text2image 720p (or 256p text2video) requests: N calls of `forward_gen` with
2 branches each, against one call with 2N branches. Prints seconds per request-step and the speed-up.

    python benchmarks/batching.py --requests 4
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from forward import SIZES, build_models  # noqa: E402

from cosmos3.model.sequence import pack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=["t2i-720p", "256p"])
    args = parser.parse_args()
    cfg, _, ours = build_models("nano", "cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.requests} requests, one guided step")
    print("| size | one at a time (s per request-step) | batched (s per request-step) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for size in args.sizes:
        frames, h, w = SIZES[size]
        shape = ((frames - 1) // 4 + 1, h // 16, w // 16)
        g = torch.Generator().manual_seed(0)
        requests = []
        for _ in range(args.requests):
            packs = [
                pack(
                    cfg, torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), shape, [], 24.0, 4, device="cuda"
                )
                for n in (300, 120)
            ]
            latent = torch.randn(cfg.latent_channel, *shape, generator=g).to("cuda", torch.bfloat16)
            requests.append((packs, [ours.und_cache(p) for p in packs], latent))
        t = torch.tensor(937, device="cuda")
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
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                times[name] = (time.perf_counter() - start) / 3 / args.requests
        print(
            f"| {size} | {times['single']:.4f} | {times['batched']:.4f} | {times['single'] / times['batched']:.2f}x |"
        )


if __name__ == "__main__":
    main()
