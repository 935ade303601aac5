"""Layerwise offload: one guided denoising step with every layer resident on the GPU, then with the layers in pinned
host memory streamed a layer ahead (optionally keeping the first N resident). Prints seconds per step, peak GPU
memory and whether the velocities are equal.

    python benchmarks/offload.py --preset nano --size 480p
    python benchmarks/offload.py --preset super --size 480p --resident 40    # an H200: part of Super offloaded
    python benchmarks/offload.py --preset tiny --size tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json

import torch
from common import SIZES, default_device, inputs, random_model, timed

from cosmos3.parallel.offload import offload_layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--size", default="480p", choices=sorted(SIZES))
    parser.add_argument("--resident", type=int, default=0, help="first layers kept on the GPU when offloading")
    parser.add_argument("--skip-resident", action="store_true", help="only the offloaded run (model too large)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = default_device()
    cfg, model = random_model(args.preset, device)
    cond, vision = inputs(cfg, args.size, device, seed=1)
    uncond, _ = inputs(cfg, args.size, device, prompt_tokens=120, seed=2)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    step = torch.tensor(900.0, device=device)

    @torch.inference_mode()
    def guided_step():
        caches = [model.und_cache(p) for p in (cond, uncond)]
        return model.forward_gen([cond, uncond], caches, vision, step)

    rows = {"preset": args.preset, "size": args.size, "weights_gib": round(weights, 2), "layers": len(model.layers)}
    resident_out = None
    if not args.skip_resident:
        seconds, peak, resident_out = timed(guided_step, args.repeat)
        rows["resident"] = {"s_per_step": round(seconds, 4), "peak_gib": round(peak, 2)}
    offload_layers(model, device, resident=args.resident)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds, peak, out = timed(guided_step, args.repeat)
    rows["offload"] = {
        "resident_layers": args.resident,
        "s_per_step": round(seconds, 4),
        "peak_gib": round(peak, 2),
    }
    if resident_out is not None:
        rows["offload"]["equal"] = all(
            torch.equal(a, b)
            for ra, rb in zip(resident_out, out, strict=True)
            for a, b in zip(ra, rb, strict=True)
            if a is not None
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
