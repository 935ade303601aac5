"""Any parallel layout at any size: seconds per guided step, speed-up over one GPU, peak memory per GPU and the
velocity's difference from the one-GPU run (random bf16 weights, the same on every rank and in the baseline).

    python benchmarks/parallel.py --preset nano --size 720p --save-baseline /tmp/nano720.pt     # one GPU
    torchrun --nproc-per-node 8 benchmarks/parallel.py --preset nano --size 720p --cfg 2 --ulysses 4 \\
        --baseline /tmp/nano720.pt
    python benchmarks/parallel.py --preset tiny --size tiny-smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from common import SCHEDULE, SIZES, default_device, inputs, random_model, timed

from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.sampler import Denoising, Schedule, Stream, denoise
from cosmos3.parallel.launch import COLLECTIVE_TIMEOUT, rank_device
from cosmos3.parallel.layout import SINGLE, Layout, backend_for, make_groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--cfg", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per timed run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--save-baseline", help="one GPU: save seconds per step and the latents here")
    parser.add_argument("--baseline", help="compare with a saved one-GPU run")
    args = parser.parse_args()
    layout = Layout(args.tp, args.cfg, args.ulysses)
    device = default_device()
    groups = SINGLE
    if layout.world_size > 1:
        device = rank_device(device, int(os.environ["RANK"]))
        dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)
        groups = make_groups(layout)
    cfg, model = random_model(args.preset, device, groups)
    cond, vision = inputs(cfg, args.size, device, seed=1)
    uncond, _ = inputs(cfg, args.size, device, prompt_tokens=120, seed=2)

    request = GenerateRequest(num_steps=args.steps, guidance=6.0)  # the fields `denoise` reads

    @torch.inference_mode()
    def run():
        job = Denoising([cond, uncond], [Stream("vision", vision[None].clone())], request)
        denoise(model, Schedule(SCHEDULE), [job], progress=False, groups=groups)
        return job.streams[0].latents

    seconds, peak, latents = timed(run, args.repeat)
    row = {
        "preset": args.preset,
        "size": args.size,
        "layout": {"cfg": args.cfg, "ulysses": args.ulysses, "tp": args.tp},
        "gpus": layout.world_size,
        "s_per_step": round(seconds / args.steps, 4),
        "projected_35_steps_s": round(35 * seconds / args.steps, 1),
        "peak_gib_per_gpu": round(peak, 2),
    }
    if args.save_baseline and groups.leader:
        torch.save({"s_per_step": seconds / args.steps, "latents": latents.cpu()}, args.save_baseline)
    if args.baseline and groups.leader:
        base = torch.load(args.baseline)
        ref = base["latents"].to(latents.device)
        row["speedup"] = round(base["s_per_step"] / (seconds / args.steps), 2)
        row["rel_diff"] = float((latents - ref).norm() / ref.norm())
    if groups.leader:
        print(json.dumps(row))
    if layout.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
