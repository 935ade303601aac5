"""One full guided denoising step at Nano size: cosmos3 vs diffusers' Cosmos3OmniTransformer, same process.

diffusers runs its two forwards (conditional, unconditional); cosmos3 runs its fast path (`forward_gen`: both
branches together, the prompts' understanding keys/values cached per request, cuDNN attention). Same random
bf16 weights (shared tensors), same inputs. Prints seconds per step, the ratio, effective TFLOP/s (the reference's
FLOPs over the time), peak memory and the relative error of the guided velocity.

    python benchmarks/denoiser.py --sizes t2i-720p 256p 480p 720p --variants exact compile fp8
    python benchmarks/denoiser.py --preset tiny --sizes tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import SIZES, build_models, default_device, gpu_name, inputs, print_table, save_rows

from cosmos3.reference import reference_forward

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
    device = default_device()
    cuda = device.type == "cuda"
    cfg, ref, ours = build_models(args.preset, device)
    rows = []
    for variant in args.variants:
        if variant == "compile":
            ours.compile_generation_layers()
        if variant == "fp8":  # last: it replaces the generation linears
            from cosmos3.model.fp8 import use_fp8_generation_linears

            use_fp8_generation_linears(ours)
        for size in args.sizes:
            cond, vision = inputs(cfg, size, device, seed=1, dtype=torch.bfloat16)
            uncond, _ = inputs(cfg, size, device, prompt_tokens=120, seed=2)
            packs = [cond, uncond]
            gen_tokens = vision.shape[1] * cond.vision_tokens_per_frame
            t = 937
            with torch.inference_mode():

                def reference_step(vision=vision, packs=packs):
                    c = reference_forward(ref, packs[0], vision, t)[0].float()
                    u = reference_forward(ref, packs[1], vision, t)[0].float()
                    return u + GUIDANCE * (c - u)

                sync = torch.cuda.synchronize if cuda else (lambda: None)
                start = time.perf_counter()
                caches = [ours.und_cache(p) for p in packs]
                sync()
                cache_s = time.perf_counter() - start

                def ours_step(vision=vision, packs=packs, caches=caches):
                    c, u = (o[0].float() for o in ours.forward_gen(packs, caches, vision, t))
                    return u + GUIDANCE * (c - u)

                # Interleaved, so that both see the same clocks (a hot GPU runs slower).
                ours_step(), reference_step()  # warm-up (and compilation)
                steps = {"cosmos3": ours_step, "diffusers": reference_step}
                times, outs, peaks = {name: [] for name in steps}, {}, {}
                for _ in range(args.repeat):
                    for name, fn in steps.items():
                        if cuda:
                            torch.cuda.empty_cache()  # neither side pays for the other's cached blocks
                            torch.cuda.reset_peak_memory_stats()
                        sync()
                        start = time.perf_counter()
                        outs[name] = fn()
                        sync()
                        times[name].append(time.perf_counter() - start)
                        peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
                t_ours, t_ref = (sorted(times[n])[len(times[n]) // 2] for n in ("cosmos3", "diffusers"))
                out_ours, out_ref = outs["cosmos3"], outs["diffusers"]
                mem_ours, mem_ref = peaks["cosmos3"], peaks["diffusers"]
            rel = ((out_ours - out_ref).norm() / out_ref.norm()).item()
            flops = 2 * forward_flops(cfg, 210, gen_tokens)
            row = dict(
                size=size,
                variant=variant,
                gen_tokens=gen_tokens,
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
            if cuda:
                torch.cuda.empty_cache()
    print(f"\n{gpu_name(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print_table(
        [
            "size",
            "variant",
            "gen tokens",
            "diffusers s/step",
            "cosmos3 s/step",
            "ratio",
            "eff. TFLOP/s (d / c)",
            "peak GiB (d / c)",
            "rel. err",
        ],
        [
            [r["size"], r["variant"], f"{r['gen_tokens']:,}", r["diffusers_s"], r["cosmos3_s"], r["ratio"]]
            + [
                f"{r['diffusers_tflops']} / {r['cosmos3_tflops']}",
                f"{r['diffusers_peak_gib']} / {r['cosmos3_peak_gib']}",
            ]
            + [r["rel_err"]]
            for r in rows
        ],
        left=2,
    )
    save_rows(rows, args.json)


if __name__ == "__main__":
    main()
