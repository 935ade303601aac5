"""A whole request through `Generator.generate` vs diffusers' `Cosmos3OmniPipeline`, same process and weights.

Nano transformer and a full-size Wan2.2 VAE (48 latent channels), random bf16 weights shared by both; text2video
at 480p (832x480), 189 frames, 4 steps, guidance 6. Also runs cosmos3 with step caching over 35 steps at 256p to
report how many steps it computes and how far its latents move from the exact path.

    python benchmarks/pipeline.py
"""

from __future__ import annotations

import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from forward import build_models  # noqa: E402

from cosmos3.generation.pipeline import Generator  # noqa: E402
from cosmos3.generation.request import GenerateRequest  # noqa: E402
from cosmos3.loading.tiny import build_tokenizer  # noqa: E402


def wan22_vae():
    from diffusers import AutoencoderKLWan

    with torch.device("cuda"):
        vae = AutoencoderKLWan(
            base_dim=160,
            decoder_base_dim=256,
            z_dim=48,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
        )
    return vae.to(torch.bfloat16).eval()


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30, out


def main() -> None:
    from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler

    cfg, ref, ours = build_models("nano", "cuda")
    vae = wan22_vae()
    tokenizer = build_tokenizer()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=10.0)
    pipe = Cosmos3OmniPipeline(
        transformer=ref, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler, enable_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    gen = Generator(ours, vae, dict(scheduler.config), tokenizer)
    prompt = "A robot arm picks up a red cup from a wooden table in a bright lab."
    request = GenerateRequest(
        mode="text2video", prompt=prompt, num_frames=189, height=480, width=832, num_steps=4, guidance=6.0, seed=0
    ).resolved()

    def run_ref():
        return pipe(
            prompt=prompt,
            num_frames=189,
            height=480,
            width=832,
            num_inference_steps=4,
            guidance_scale=6.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).video

    with torch.inference_mode():
        rows = []
        for name, fn in (
            ("cosmos3", lambda: gen.generate(request, progress=False).video),
            ("diffusers", run_ref),
            ("cosmos3", lambda: gen.generate(request, progress=False).video),
            ("diffusers", run_ref),
        ):
            seconds, peak, out = timed(fn)
            rows.append((name, seconds, peak))
            print(json.dumps({"run": name, "s": round(seconds, 2), "peak_gib": round(peak, 2)}), flush=True)
        ours_s = rows[2][1]
        ref_s = rows[3][1]
        print(
            f"\nwhole request 480p x 189 frames, 4 steps: diffusers {ref_s:.2f} s, cosmos3 {ours_s:.2f} s, "
            f"ratio {ours_s / ref_s:.3f}; peak GiB diffusers {rows[3][2]:.1f}, cosmos3 {rows[2][2]:.1f}"
        )

        exact = GenerateRequest(
            mode="text2video", prompt=prompt, num_frames=189, height=192, width=320, num_steps=35, guidance=6.0, seed=0
        ).resolved()
        base_s, _, base = timed(lambda: gen.generate(exact, progress=False))
        for threshold in (0.05, 0.1, 0.2):
            cached = GenerateRequest(**{**exact.__dict__, "step_cache": threshold})
            seconds, _, out = timed(lambda cached=cached: gen.generate(cached, progress=False))
            err = ((out.latents - base.latents).norm() / base.latents.norm()).item()
            print(
                json.dumps(
                    {
                        "step_cache": threshold,
                        "computed_steps": gen.last_computed_steps,
                        "of": 35,
                        "s": round(seconds, 2),
                        "exact_s": round(base_s, 2),
                        "latent_rel_err": round(err, 4),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
