"""Where a guided denoising step's GPU time goes: one cosmos3 step (`forward_gen`, both CFG branches) under
torch.profiler, kernels grouped into attention, matrix products and the elementwise rest. Also the time of the
first (compiling) call with `--compile`, which is what a request pays before its steps get faster.

    python benchmarks/profile_step.py --size 720p [--compile] [--flash-attention]
    python benchmarks/profile_step.py --preset tiny --size tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from common import SIZES, default_device, gpu_name, inputs, print_table, random_model

from cosmos3.engine import speed_up_generation

# Substrings of kernel names, first match wins: cuDNN / flash attention kernels, then cuBLAS / CUTLASS GEMMs.
CATEGORIES = [
    ("attention", ("fmha", "flash", "attention", "cudnn_generated", "sdpa")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "cublas")),
]


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "elementwise / other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--flash-attention", action="store_true", help="FlashAttention-4 from MIN_QUERIES queries (the default's)"
    )
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    device = default_device()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg, model = random_model(args.preset, device)
    flash = "auto" if args.flash_attention else False
    speed_up_generation(model, device, compile=args.compile, flash_attention=flash, one_gpu=cuda)
    cond, vision = inputs(cfg, args.size, device, seed=1, dtype=torch.bfloat16)
    uncond, _ = inputs(cfg, args.size, device, prompt_tokens=120, seed=2)
    packs = [cond, uncond]
    with torch.inference_mode():
        caches = [model.und_cache(p) for p in packs]
        step = lambda: model.forward_gen(packs, caches, vision, 937)
        sync()
        start = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - start
        times = []
        for _ in range(2):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            sync()
    attention = getattr(model.generation_attention, "__name__", type(model.generation_attention).__name__)
    print(f"{gpu_name(device)}, torch {torch.__version__}, {args.size}, compile={args.compile}, attention={attention}")
    print(f"first call {first:.2f} s, then {min(times):.3f} s per guided step", flush=True)
    totals: dict[str, float] = defaultdict(float)
    kernels = []
    for e in prof.key_averages():
        us = e.device_time_total if cuda else e.self_cpu_time_total
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if us <= 0:
            continue
        totals[category(e.key)] += us
        kernels.append((us, e.count, e.key))
    whole = sum(totals.values()) or 1.0
    print_table(
        ["category", "ms", "share"],
        [[k, f"{v / 1e3:.1f}", f"{v / whole:.1%}"] for k, v in sorted(totals.items(), key=lambda kv: -kv[1])],
    )
    kernels.sort(reverse=True)
    print_table(
        ["kernel", "calls", "ms", "category"],
        [[k[:90], n, f"{us / 1e3:.1f}", category(k)] for us, n, k in kernels[: args.top]],
    )


if __name__ == "__main__":
    main()
