"""One denoiser forward at full size: cosmos3 vs diffusers' Cosmos3OmniTransformer, same process, same weights.

Nano config (or --preset), random bf16 weights shared by both models (one copy in memory), 300 text tokens,
189 frames at 24 fps. Prints seconds per forward, the ratio, peak memory and the max relative difference.

    python benchmarks/forward.py --sizes 480p 720p
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cosmos3.config import preset
from cosmos3.model.sequence import pack
from cosmos3.model.transformer import Cosmos3Transformer

SIZES = {
    "tiny-smoke": (9, 64, 96),
    "t2i-720p": (1, 720, 1280),
    "256p": (189, 192, 320),
    "480p": (189, 480, 832),
    "720p": (189, 720, 1280),
}


def build_models(name: str, device: str):
    from diffusers import Cosmos3OmniTransformer

    cfg = preset(name)
    with torch.device("meta"):
        ref = Cosmos3OmniTransformer(**cfg.to_dict())  # our config keys are the checkpoint keys
    ref = ref.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "norm" in pname:
                p.data = (1.0 + 0.05 * torch.randn(p.shape, generator=gen, device=device)).to(torch.bfloat16)
            elif p.ndim == 2:
                p.data = (torch.randn(p.shape, generator=gen, device=device) * p.shape[1] ** -0.5).to(torch.bfloat16)
            else:
                p.data = (0.02 * torch.randn(p.shape, generator=gen, device=device)).to(torch.bfloat16)
        ref.time_embedder.float()
        ref.rotary_emb.inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim)
        )
    ref.eval()
    with torch.device("meta"):
        ours = Cosmos3Transformer(cfg)
    ours.load_state_dict(ref.state_dict(), assign=True, strict=True)  # shares the same tensors
    return cfg, ref.eval(), ours.eval()


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """Median seconds over `repeat` runs after one warm-up, and peak GPU memory (GiB) of those runs."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return times[len(times) // 2], peak, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--sizes", nargs="+", default=["480p", "720p"], choices=sorted(SIZES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, "tests")
    from reference import reference_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, ref, ours = build_models(args.preset, device)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    rows = []
    for size in args.sizes:
        frames, h, w = SIZES[size]
        shape = ((frames - 1) // 4 + 1, h // 16, w // 16)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (300,), generator=g).tolist()
        packed = pack(cfg, ids, shape, [], 24.0, 4, device=device)
        vision = torch.randn(cfg.latent_channel, *shape, generator=g).to(device, torch.bfloat16)
        with torch.inference_mode():
            t_ref, mem_ref, out_ref = timed(
                lambda p=packed, v=vision: reference_forward(ref, p, v, 937)[0], args.repeat
            )
            t_ours, mem_ours, out_ours = timed(lambda p=packed, v=vision: ours(p, v, 937)[0], args.repeat)
        diff = ((out_ours.float() - out_ref.float()).abs().max() / out_ref.float().abs().max()).item()
        row = dict(
            size=size,
            gen_tokens=shape[0] * packed.vision_tokens_per_frame,
            diffusers_s=round(t_ref, 4),
            cosmos3_s=round(t_ours, 4),
            ratio=round(t_ours / t_ref, 3),
            diffusers_peak_gib=round(mem_ref, 2),
            cosmos3_peak_gib=round(mem_ours, 2),
            max_rel_diff=float(f"{diff:.3g}"),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{gpu}, torch {torch.__version__}, weights {weights_gib:.1f} GiB, {time.strftime('%Y-%m-%d')}")
    print(
        "| size | gen tokens | diffusers s | cosmos3 s | ratio | diffusers peak GiB | cosmos3 peak GiB | max rel diff |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['size']} | {r['gen_tokens']:,} | {r['diffusers_s']} | {r['cosmos3_s']} | {r['ratio']} | "
            f"{r['diffusers_peak_gib']} | {r['cosmos3_peak_gib']} | {r['max_rel_diff']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
