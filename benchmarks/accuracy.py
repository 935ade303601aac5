"""How far each bf16 implementation is from an fp32 reference, and which attention backend does what.

Nano widths with fewer layers (so that an fp32 copy fits beside the bf16 one): diffusers fp32 is the reference;
diffusers bf16, cosmos3's plain forward and its fast path (with cuDNN or flash attention first) are compared
to it by relative L2 error of the velocity, and timed. The fp32 and bf16 models hold the same random weights.

    python benchmarks/accuracy.py --layers 12 --sizes 256p 720p
    python benchmarks/accuracy.py --preset tiny --layers 2 --sizes tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from common import SIZES, build_models, default_device, inputs, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

from cosmos3.config import preset
from cosmos3.reference import reference_forward

# cosmos3 leaves the backend to torch (cosmos3.model.layers); here each order is set around cosmos3's calls only.
# diffusers runs first, so torch has made its own first choice before any order is set and restored.
FALLBACK = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
BACKENDS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, *FALLBACK],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, *FALLBACK],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--sizes", nargs="+", default=["256p", "720p"], choices=sorted(SIZES))
    args = parser.parse_args()
    device = default_device()
    cfg = dataclasses.replace(preset(args.preset), num_hidden_layers=args.layers)
    _, ref32, _ = build_models(cfg, device, dtype=torch.float32)
    _, ref16, ours = build_models(cfg, device)  # the same values, rounded to bf16
    for size in args.sizes:
        packed, vision = inputs(cfg, size, device, seed=1)
        with torch.inference_mode():
            base = reference_forward(ref32, packed, vision, 937)[0].float()
            rows = {}
            t, _, out = timed(lambda: reference_forward(ref16, packed, vision.bfloat16(), 937)[0], 2)
            rows["diffusers bf16"] = (t, out)
            for backend, order in BACKENDS.items():
                with sdpa_kernel(order, set_priority=True):
                    t, _, out = timed(lambda: ours(packed, vision.bfloat16(), 937)[0], 2)
                    rows[f"cosmos3 plain {backend}"] = (t, out)
                    cache = ours.und_cache(packed)
                    t, _, out = timed(lambda c=cache: ours.forward_gen([packed], [c], vision.bfloat16(), 937)[0][0], 2)
                    rows[f"cosmos3 fast {backend}"] = (t, out)
            t, _, out = timed(lambda: reference_forward(ref16, packed, vision.bfloat16(), 937)[0], 2)
            rows["diffusers bf16 (again, after cosmos3)"] = (t, out)
        for name, (t, out) in rows.items():
            err = ((out.float() - base).norm() / base.norm()).item()
            print(
                json.dumps({"size": size, "impl": name, "s": round(t, 4), "rel_err_vs_fp32": float(f"{err:.3g}")}),
                flush=True,
            )


if __name__ == "__main__":
    main()
