"""How far each bf16 implementation is from an fp32 reference, and which attention backend does what.

Nano widths with fewer layers (so that an fp32 copy fits beside the bf16 one): diffusers fp32 is the reference;
diffusers bf16, cosmos3's plain forward and its fast path (with cuDNN or flash attention first) are compared
to it by relative L2 error of the velocity, and timed.

    python benchmarks/accuracy.py --layers 12 --sizes 256p 720p
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests")
from forward import SIZES, timed  # noqa: E402

import cosmos3.model.layers as layers  # noqa: E402
from cosmos3.config import preset  # noqa: E402
from cosmos3.model.sequence import pack  # noqa: E402
from cosmos3.model.transformer import Cosmos3Transformer  # noqa: E402

from reference import reference_forward  # noqa: E402

BACKENDS = {"cudnn": layers.SDPA_PRIORITY, "flash": [layers.SDPBackend.FLASH_ATTENTION, *layers.SDPA_PRIORITY]}


def main() -> None:
    from diffusers import Cosmos3OmniTransformer

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--sizes", nargs="+", default=["256p", "720p"])
    args = parser.parse_args()
    cfg = dataclasses.replace(preset("nano"), num_hidden_layers=args.layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        ref32 = Cosmos3OmniTransformer(**cfg.to_dict())
    ref32 = ref32.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in ref32.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.05 * torch.randn_like(p))
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
            else:
                p.copy_(0.02 * torch.randn_like(p))
        ref32.rotary_emb.inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cuda") / cfg.head_dim)
        )
    with torch.device("meta"):
        ref16 = Cosmos3OmniTransformer(**cfg.to_dict())
    ref16.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref32.state_dict().items()}, assign=True)
    ref16.time_embedder.float()
    ref16.rotary_emb.inv_freq = ref32.rotary_emb.inv_freq
    with torch.device("meta"):
        ours = Cosmos3Transformer(cfg)
    ours.load_state_dict(ref16.state_dict(), assign=True, strict=True)
    for size in args.sizes:
        frames, h, w = SIZES[size]
        shape = ((frames - 1) // 4 + 1, h // 16, w // 16)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (300,), generator=g).tolist()
        packed = pack(cfg, ids, shape, [], 24.0, 4, device="cuda")
        vision = torch.randn(cfg.latent_channel, *shape, generator=g).cuda()
        with torch.inference_mode():
            base = reference_forward(ref32, packed, vision, 937)[0].float()
            rows = {}
            t, _, out = timed(lambda: reference_forward(ref16, packed, vision.bfloat16(), 937)[0], 2)
            rows["diffusers bf16"] = (t, out)
            for backend, order in BACKENDS.items():
                layers.SDPA_PRIORITY = order
                t, _, out = timed(lambda: ours(packed, vision.bfloat16(), 937)[0], 2)
                rows[f"cosmos3 plain {backend}"] = (t, out)
                cache = ours.und_cache(packed)
                t, _, out = timed(lambda c=cache: ours.forward_gen([packed], [c], vision.bfloat16(), 937)[0][0], 2)
                rows[f"cosmos3 fast {backend}"] = (t, out)
            layers.SDPA_PRIORITY = BACKENDS["cudnn"]
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
