"""A whole request through `Generator.generate` vs diffusers' `Cosmos3OmniPipeline`, same process and weights.

Nano transformer and a full-size Wan2.2 VAE (48 latent channels), random bf16 weights shared by both; text2video
at 480p (832x480), 189 frames, 4 steps, guidance 6. Also runs cosmos3 with step caching over 35 steps at 256p to
report how many steps it computes and how far its latents move from the exact path.

    python benchmarks/pipeline.py
    python benchmarks/pipeline.py --preset tiny --size tiny-smoke --cache-size tiny-smoke --cache-steps 6  # CPU
"""

from __future__ import annotations

import argparse
import json

import torch
from common import SCHEDULE, SIZES, VAE_SPATIAL, VAE_TEMPORAL, build_models, default_device, timed, wan22_vae

from cosmos3.generation.codecs import VideoCodec
from cosmos3.generation.parts import Parts
from cosmos3.generation.pipeline import Generator
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.sampler import Schedule
from cosmos3.loading.tiny import build_tokenizer

PROMPT = "A robot arm picks up a red cup from a wooden table in a bright lab."


def request(size: str, steps: int, **fields) -> GenerateRequest:
    frames, height, width = SIZES[size]
    fields = dict(num_frames=frames, height=height, width=width, num_steps=steps, guidance=6.0, seed=0, **fields)
    return GenerateRequest(mode="text2video", prompt=PROMPT, **fields).resolved(vae_factors=(VAE_SPATIAL, VAE_TEMPORAL))


def main() -> None:
    from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--size", default="480p", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache-size", default="256p", choices=sorted(SIZES), help="size of the step-cache runs")
    parser.add_argument("--cache-steps", type=int, default=35)
    args = parser.parse_args()
    device = default_device()
    cfg, ref, ours = build_models(args.preset, device)
    vae = wan22_vae(device, cfg.latent_channel, full=args.preset != "tiny")
    tokenizer = build_tokenizer()
    scheduler = UniPCMultistepScheduler.from_config(SCHEDULE)
    pipe = Cosmos3OmniPipeline(
        transformer=ref, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler, enable_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    parts = Parts(
        transformer=ours,
        video=VideoCodec(vae, cfg.latent_channel),
        sound=None,
        tokenizer=tokenizer,
        schedule=Schedule(dict(scheduler.config)),
    )
    gen = Generator(parts)
    req = request(args.size, args.steps)

    def run_ref():
        return pipe(
            prompt=PROMPT,
            num_frames=req.num_frames,
            height=req.height,
            width=req.width,
            num_inference_steps=req.num_steps,
            guidance_scale=req.guidance,
            generator=torch.Generator().manual_seed(req.seed),
            output_type="np",
        ).video

    with torch.inference_mode():
        rows = {}
        for name, fn in (("cosmos3", lambda: gen.generate(req, progress=False).video), ("diffusers", run_ref)):
            seconds, peak, _ = timed(fn, repeat=1)  # the second of two runs
            rows[name] = (seconds, peak)
            print(json.dumps({"run": name, "s": round(seconds, 2), "peak_gib": round(peak, 2)}), flush=True)
        (ours_s, ours_peak), (ref_s, ref_peak) = rows["cosmos3"], rows["diffusers"]
        frames, height, width = SIZES[args.size]
        print(
            f"\nwhole request {args.size} ({width}x{height} x {frames} frames), {args.steps} steps: "
            f"diffusers {ref_s:.2f} s, cosmos3 {ours_s:.2f} s, ratio {ours_s / ref_s:.3f}; "
            f"peak GiB diffusers {ref_peak:.1f}, cosmos3 {ours_peak:.1f}"
        )

        exact = request(args.cache_size, args.cache_steps)
        base_s, _, base = timed(lambda: gen.generate(exact, progress=False), repeat=1)
        for threshold in (0.05, 0.1, 0.2):
            cached = request(args.cache_size, args.cache_steps, step_cache=threshold)
            seconds, _, out = timed(lambda cached=cached: gen.generate(cached, progress=False), repeat=1)
            err = ((out.latents - base.latents).norm() / base.latents.norm()).item()
            print(
                json.dumps(
                    {
                        "step_cache": threshold,
                        "computed_steps": out.metadata["computed_steps"],
                        "of": args.cache_steps,
                        "s": round(seconds, 2),
                        "exact_s": round(base_s, 2),
                        "latent_rel_err": round(err, 4),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
