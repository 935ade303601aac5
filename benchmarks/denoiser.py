"""One full guided denoising step at Nano size: cosmos3 vs diffusers' Cosmos3OmniTransformer, same process.

diffusers runs its two forwards (conditional, unconditional); cosmos3 runs its fast path (`forward_gen`: both
branches together, the prompts' understanding keys/values cached per request, cuDNN attention). Same random
bf16 weights (shared tensors), same inputs. Prints seconds per step, the ratio, effective TFLOP/s (the reference's
FLOPs over the time), peak memory and the relative error of the guided velocity.

    python benchmarks/denoiser.py --sizes t2i-720p 256p 480p 720p --variants exact compile fp8
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests")
from forward import SIZES, build_models  # noqa: E402

from cosmos3.model.sequence import pack  # noqa: E402

from reference import reference_forward  # noqa: E402

GUIDANCE = 6.0


def forward_flops(cfg, und: int, gen: int) -> float:
    """Matmul FLOPs of one reference forward (both pathways, attention included)."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_token = 2 * (2 * h * hq + 2 * h * hkv) + 2 * 3 * h * i
    attention = 4 * cfg.num_attention_heads * hd * (und * und / 2 + gen * (und + gen))
    return cfg.num_hidden_layers * ((und + gen) * per_token + attention)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--sizes", nargs="+", default=["t2i-720p", "256p", "480p", "720p"], choices=sorted(SIZES))
    parser.add_argument("--variants", nargs="+", default=["exact"], choices=["exact", "compile", "fp8"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, ref, ours = build_models(args.preset, device)
    rows = []
    for variant in args.variants:
        if variant == "compile":
            ours.compile_generation_layers()
        if variant == "fp8":  # last: it replaces the generation linears
            from cosmos3.model.fp8 import use_fp8_generation_linears

            use_fp8_generation_linears(ours)
        for size in args.sizes:
            frames, h, w = SIZES[size]
            shape = ((frames - 1) // 4 + 1, h // 16, w // 16)
            g = torch.Generator().manual_seed(1)
            cond_ids = torch.randint(0, cfg.vocab_size, (300,), generator=g).tolist()
            uncond_ids = torch.randint(0, cfg.vocab_size, (120,), generator=g).tolist()
            packs = [pack(cfg, ids, shape, [], 24.0, 4, device=device) for ids in (cond_ids, uncond_ids)]
            vision = torch.randn(cfg.latent_channel, *shape, generator=g).to(device, torch.bfloat16)
            t = 937
            with torch.inference_mode():

                def reference_step(vision=vision, packs=packs):
                    c = reference_forward(ref, packs[0], vision, t)[0].float()
                    u = reference_forward(ref, packs[1], vision, t)[0].float()
                    return u + GUIDANCE * (c - u)

                start = time.perf_counter()
                caches = [ours.und_cache(p) for p in packs]
                if device == "cuda":
                    torch.cuda.synchronize()
                cache_s = time.perf_counter() - start

                def ours_step(vision=vision, packs=packs, caches=caches):
                    c, u = (o[0].float() for o in ours.forward_gen(packs, caches, vision, t))
                    return u + GUIDANCE * (c - u)

                # Interleaved, so that both see the same clocks (a hot GPU runs slower).
                out_ours, out_ref = ours_step(), reference_step()  # warm-up (and compilation)
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                times_ours, times_ref = [], []
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(args.repeat):
                    for fn, times in ((ours_step, times_ours), (reference_step, times_ref)):
                        if device == "cuda":
                            torch.cuda.empty_cache()  # neither side pays for the other's cached blocks
                        sync()
                        start = time.perf_counter()
                        out = fn()
                        sync()
                        times.append(time.perf_counter() - start)
                        if fn is ours_step:
                            out_ours = out
                            mem_ours = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
                            if device == "cuda":
                                torch.cuda.reset_peak_memory_stats()
                        else:
                            out_ref = out
                            mem_ref = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
                            if device == "cuda":
                                torch.cuda.reset_peak_memory_stats()
                t_ours, t_ref = sorted(times_ours)[len(times_ours) // 2], sorted(times_ref)[len(times_ref) // 2]
            rel = ((out_ours - out_ref).norm() / out_ref.norm()).item()
            flops = 2 * forward_flops(cfg, 210, shape[0] * packs[0].vision_tokens_per_frame)
            row = dict(
                size=size,
                variant=variant,
                gen_tokens=shape[0] * packs[0].vision_tokens_per_frame,
                diffusers_s=round(t_ref, 4),
                cosmos3_s=round(t_ours, 4),
                ratio=round(t_ours / t_ref, 3),
                diffusers_tflops=round(flops / t_ref / 1e12),
                cosmos3_tflops=round(flops / t_ours / 1e12),
                diffusers_peak_gib=round(mem_ref, 2),
                cosmos3_peak_gib=round(mem_ours, 2),
                rel_err=float(f"{rel:.3g}"),
                und_cache_s=round(cache_s, 4),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            del caches
            if device == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(
        "| size | variant | gen tokens | diffusers s/step | cosmos3 s/step | ratio | eff. TFLOP/s (d / c) "
        "| peak GiB (d / c) | rel. err |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['size']} | {r['variant']} | {r['gen_tokens']:,} | {r['diffusers_s']} | {r['cosmos3_s']} | "
            f"{r['ratio']} | {r['diffusers_tflops']} / {r['cosmos3_tflops']} | {r['diffusers_peak_gib']} / "
            f"{r['cosmos3_peak_gib']} | {r['rel_err']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
