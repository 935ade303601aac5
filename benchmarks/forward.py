"""One denoiser forward at full size: cosmos3 vs diffusers' Cosmos3OmniTransformer, same process, same weights.

Nano config (or --preset), random bf16 weights shared by both models (one copy in memory), 300 text tokens,
189 frames at 24 fps. Prints seconds per forward, the ratio, peak memory and the max relative difference.

    python benchmarks/forward.py --sizes 480p 720p
    python benchmarks/forward.py --preset tiny --sizes tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import SIZES, build_models, default_device, gpu_name, inputs, print_table, save_rows, timed

from cosmos3.reference import reference_forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--sizes", nargs="+", default=["480p", "720p"], choices=sorted(SIZES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = default_device()
    cfg, ref, ours = build_models(args.preset, device)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    rows = []
    for size in args.sizes:
        packed, vision = inputs(cfg, size, device, seed=1, dtype=torch.bfloat16)
        with torch.inference_mode():
            t_ref, mem_ref, out_ref = timed(
                lambda p=packed, v=vision: reference_forward(ref, p, v, 937)[0], args.repeat
            )
            t_ours, mem_ours, out_ours = timed(lambda p=packed, v=vision: ours(p, v, 937)[0], args.repeat)
        diff = ((out_ours.float() - out_ref.float()).abs().max() / out_ref.float().abs().max()).item()
        row = dict(
            size=size,
            gen_tokens=vision.shape[1] * packed.vision_tokens_per_frame,
            diffusers_s=round(t_ref, 4),
            cosmos3_s=round(t_ours, 4),
            ratio=round(t_ours / t_ref, 3),
            diffusers_peak_gib=round(mem_ref, 2),
            cosmos3_peak_gib=round(mem_ours, 2),
            max_rel_diff=float(f"{diff:.3g}"),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n{gpu_name(device)}, torch {torch.__version__}, weights {weights_gib:.1f} GiB, {time.strftime('%Y-%m-%d')}"
    )
    print_table(
        [
            "size",
            "gen tokens",
            "diffusers s",
            "cosmos3 s",
            "ratio",
            "diffusers peak GiB",
            "cosmos3 peak GiB",
            "max rel diff",
        ],
        [
            [r["size"], f"{r['gen_tokens']:,}", r["diffusers_s"], r["cosmos3_s"], r["ratio"]]
            + [r["diffusers_peak_gib"], r["cosmos3_peak_gib"], r["max_rel_diff"]]
            for r in rows
        ],
    )
    save_rows(rows, args.json)


if __name__ == "__main__":
    main()
