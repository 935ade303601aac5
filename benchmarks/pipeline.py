"""Whole requests: diffusers' `Cosmos3OmniPipeline` against cosmos3's `Generator`, exact and fast modes.

Nano transformer and a full-size Wan2.2 VAE (48 latent channels), random bf16 weights shared by every variant
(one copy of the bf16 weights in memory; FP8 variants add their FP8 copy of the generation linears). Each workload
runs at two step counts so that the per-step time and the fixed cost (VAE encode/decode, prompt, setup) separate:

    per-step = (t_hi - t_lo) / (n_hi - n_lo),  fixed = t_lo - n_lo * per-step,  35-step = fixed + 35 * per-step

(for step-cache variants n counts the steps computed, and the 35-step figure uses the steps computed at 35, from
the request itself where 35 is one of its step counts, else from the 35-step probe at 256p). Every variant first
runs a warm-up request at n_lo that is not timed (for compile variants it pays the compile: reported as
"warm-up s"); then the variants run interleaved, one request each at n_lo, then at n_hi, so that all of them see
the same clocks. Every step's end is timed inside each request too ("s/step timed": the median step of the n_hi
request but its first, which also holds the prompt's encoding); `--steps N` runs whole N-step requests only (after a
1-step warm-up), with the per-step time from those steps. Ratios are cosmos3 / diffusers. "rel. err" is
||x - x_exact|| / ||x_exact|| of the final latents at n_hi against cosmos3's exact path at the same step count
(for diffusers too: the distance two bf16 implementations land apart with random weights).

    python benchmarks/pipeline.py                                    # all four workloads: ~15 min on an H100/H200
    # the same in two calls of under 9 minutes (the second takes the step cache's 35-step count from the first):
    python benchmarks/pipeline.py --workloads t2v-720p t2i-720p --budget-s 520 --out pipeline-1.json    # ~7.5 min
    python benchmarks/pipeline.py --workloads i2v-720p t2v-480p --budget-s 520 --no-probe --out pipeline-2.json
    python benchmarks/pipeline.py --table pipeline-1.json pipeline-2.json              # one table from both
    python benchmarks/pipeline.py --workloads t2v-720p --variants diffusers auto --steps 35      # ~9 min, measured
    python benchmarks/pipeline.py --preset tiny --workloads tiny-smoke tiny-t2i tiny-i2v \\
        --variants diffusers exact cache                                           # CPU smoke test, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from common import SCHEDULE, VAE_SPATIAL, VAE_TEMPORAL, build_models, default_device, environment, wan22_vae, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

from cosmos3.engine import FAST_STEP_CACHE, speed_up_generation
from cosmos3.generation.codecs import VideoCodec
from cosmos3.generation.parts import Parts
from cosmos3.generation.pipeline import Generator
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.sampler import Schedule
from cosmos3.generation.wan_decode import channels_last_weights
from cosmos3.loading.tiny import build_tokenizer

PROMPT = "A robot arm picks up a red cup from a wooden table in a bright lab."
GUIDANCE = 6.0  # the documents' default for text2video and image2video
TARGET_STEPS = 35  # the documents' default step count: what a real request runs
# StepCache always computes the first two steps and the last (cosmos3.generation.sampler): at 3 steps or fewer a
# step-cache variant computes every step, i.e. runs exactly what its variant without the cache runs.
ALWAYS_COMPUTED = 3


@dataclass(frozen=True)
class Workload:
    mode: str
    frames: int
    height: int
    width: int
    steps: tuple[int, ...]  # default (n_lo, n_hi); one count: whole requests of that many steps only
    quick_steps: tuple[int, int]  # --quick


# 189 frames at 24 fps is the documents' default clip. Video at 1 and 3 steps: a 720p guided step is seconds long, so
# two extra steps measure it well; text2image steps are ~0.1 s, so 10 and 35 (the real count) measure it directly.
WORKLOADS = {
    "t2i-720p": Workload("text2image", 1, 720, 1280, (10, 35), (10, 35)),
    "t2v-256p": Workload("text2video", 189, 192, 320, (10, 35), (10, 35)),  # a 0.2 s step: measured directly
    "t2v-480p": Workload("text2video", 189, 480, 832, (1, 3), (1, 2)),
    "t2v-720p": Workload("text2video", 189, 720, 1280, (1, 3), (1, 2)),
    "i2v-720p": Workload("image2video", 189, 720, 1280, (1, 3), (1, 2)),
    # CPU smoke tests (tiny preset): every mode's path in seconds.
    "tiny-smoke": Workload("text2video", 9, 64, 96, (1, 4), (1, 4)),
    "tiny-t2i": Workload("text2image", 1, 64, 96, (2, 6), (2, 6)),
    "tiny-i2v": Workload("image2video", 9, 64, 96, (1, 3), (1, 3)),  # 3 steps: step-cache variants reuse runs
}
# The step-cache probe: 256p (320x192), as the step-cache table in benchmarks/README.md; it runs a warm-up at 1 step
# and then 35 steps (the step counts given here are not used).
PROBE = Workload("text2video", 189, 192, 320, (1, TARGET_STEPS), (1, TARGET_STEPS))
TINY_PROBE = Workload("text2video", 9, 64, 96, (1, TARGET_STEPS), (1, TARGET_STEPS))


@dataclass(frozen=True)
class Variant:
    """How cosmos3 is set up: the Engine's switches (`cosmos3.load(..., fp8=, compile=)`, request `step_cache`)."""

    fp8: bool = False
    compile: bool | str = False  # True, False or "auto" (compile only passes of AUTO_COMPILE_ROWS rows and more)
    step_cache: float | None = None
    fp8_attention: bool = False
    flash_attention: bool | str = False  # FlashAttention-4: "auto" from MIN_QUERIES queries, as the Engine's default
    cuda_graphs: bool = True  # small passes replayed from a CUDA graph (GRAPH_MAX_ROWS), as the Engine on one GPU

    def without_cache(self) -> Variant:
        return dataclasses.replace(self, step_cache=None)


# One line per variant; None is the reference pipeline. "fast" is what `cosmos3.load(..., fast=True)` sets.
VARIANTS: dict[str, Variant | None] = {
    "diffusers": None,
    "exact": Variant(cuda_graphs=False),  # the exact path, every pass eager (the arithmetic the CPU parity tests run)
    "graphs": Variant(),  # the exact path with small passes replayed from CUDA graphs (the same kernels)
    "flash": Variant(flash_attention="auto"),  # the exact path with FlashAttention-4 (bf16, exact arithmetic class)
    "auto": Variant(compile="auto", flash_attention="auto"),  # the Engine's default on one GPU
    "auto-sdpa": Variant(compile="auto", cuda_graphs=False),  # the default before FlashAttention-4 (cuDNN's SDPA)
    "auto-eager": Variant(compile="auto", flash_attention="auto", cuda_graphs=False),  # the default before graphs
    "flash+compile": Variant(compile=True, flash_attention="auto"),
    "compile": Variant(compile=True),
    "fp8": Variant(fp8=True),
    "fp8attn": Variant(fp8_attention=True),  # FP8 attention alone
    "fp8+compile": Variant(fp8=True, compile=True),
    "fp8attn+compile": Variant(fp8=True, compile=True, fp8_attention=True),  # fast without the step cache
    "cache": Variant(step_cache=FAST_STEP_CACHE),
    "fast": Variant(fp8=True, compile=True, step_cache=FAST_STEP_CACHE, fp8_attention=True),
    "fast-0.05": Variant(fp8=True, compile=True, step_cache=0.05, fp8_attention=True),  # fast before 2026-12-03
}
DEFAULT_VARIANTS = ["diffusers", "exact", "compile", "fp8+compile", "fast"]

# For the time estimate printed before a run: H200 figures of 2026-12-02 (benchmarks/results/2026-12-02-h200-*): per
# workload diffusers s/step, cosmos3 exact s/step, diffusers fixed s, cosmos3 fixed s. 720p: diffusers' step timed
# inside its requests (6.45 s; fits of other runs said up to 9.4), the exact step from the 1/2-step fit, the fixed
# costs with the chunked VAE decode; 480p: whole 35-step requests; text2image from its 35-step requests (5.26 /
# 2.44 s) with ~0.3 s fixed; 256p from denoiser.py (0.26 / 0.20 s a step) and a ~1 s decode.
ANCHORS = {
    "t2i-720p": (0.156, 0.071, 0.3, 0.3),
    "t2v-480p": (1.90, 1.75, 6.3, 3.2),
    "t2v-720p": (6.45, 6.66, 14.4, 6.8),
    "i2v-720p": (6.45, 6.66, 14.4, 9.0),
    "t2v-256p": (0.26, 0.20, 1.0, 1.0),
    "probe": (0.26, 0.20, 1.0, 1.0),
}
# cosmos3 step time relative to exact (720p anchors: 5.99 / 6.75 with compile, 5.39 / 6.75 with FP8 as well; FP8
# alone is not measured, guessed), the step cache computes ~15 of 35 steps (benchmarks/README.md "Step caching"),
# a cold compile of a new shape ~9 s (src/cosmos3/engine.py, AUTO_COMPILE_ROWS), and ~60 s to import and build.
STEP_FACTOR = {(False, False): 1.0, (False, True): 0.887, (True, False): 0.9, (True, True): 0.80}
CACHE_FRACTION = 15 / 35
COMPILE_S = 10.0
SETUP_S = 60.0


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def settle_compile_workers() -> None:
    """Wait until Inductor's compile-worker pool has started. A first compile does not wait for it (it compiles in
    this process meanwhile), so the pool's processes keep starting, each importing torch, during the requests that
    follow and compete with them for the host's cores (on the 2-core CPU machine the requests right after a compile
    ran several times slower); the launch-bound text2image requests on a GPU would feel that too."""
    try:
        from torch._inductor.async_compile import AsyncCompile

        AsyncCompile.wait_pool_ready()
    except (ImportError, AttributeError):  # a private API: without it the timings are only noisier
        pass


@dataclass
class Run:
    """One timed request."""

    workload: str
    variant: str
    steps: int
    computed: int  # steps that ran the model (fewer than `steps` with a step cache)
    s: float
    peak_gib: float
    warmup: bool = False
    step_ends: list[float] = field(default_factory=list)  # seconds from the request's start to each step's end


def step_durations(run: Run) -> list[float]:
    """Seconds of each step after the first (the first also holds the prompt's encoding and the setup)."""
    return [b - a for a, b in zip(run.step_ends[:-1], run.step_ends[1:], strict=True)]


def timed(fn: Callable[[Callable[[], None]], tuple[torch.Tensor, int]]) -> tuple[float, float, torch.Tensor, int, list]:
    """Seconds, peak GPU memory (GiB), the final latents (on the CPU), the steps computed and the step ends of one
    request. `fn(mark)` calls `mark()` at the end of each step: it waits for the GPU (one sync a step, the same for
    every variant) and notes the time. The allocator cache is emptied first, so that no variant pays for (or
    profits from) another's cached blocks."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cuda_sync()
    start = time.perf_counter()
    ends: list[float] = []

    def mark() -> None:
        cuda_sync()
        ends.append(round(time.perf_counter() - start, 4))

    latents, computed = fn(mark)
    cuda_sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return seconds, peak, latents.detach().float().cpu().reshape(-1), computed, ends


def conditioning_image(height: int, width: int) -> np.ndarray:
    """A deterministic HxWx3 uint8 conditioning image (a gradient with noise: not flat, so the encoder works)."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def make_request(w: Workload, steps: int, step_cache: float | None = None) -> GenerateRequest:
    fields = dict(num_frames=w.frames, height=w.height, width=w.width, num_steps=steps, guidance=GUIDANCE, seed=0)
    if w.mode == "image2video":
        fields["image"] = conditioning_image(w.height, w.width)
    req = GenerateRequest(mode=w.mode, prompt=PROMPT, step_cache=step_cache, **fields)
    return req.resolved(vae_factors=(VAE_SPATIAL, VAE_TEMPORAL))


class Bench:
    """The models (built once, weights shared), a runner per variant, and the JSON record of everything timed."""

    def __init__(self, args: argparse.Namespace):
        from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler

        self.device = default_device()
        # torch's SDPA choice before anything else attends: what diffusers gets in a process of its own.
        sdpa_at_start = sdpa_choice(self.device, torch.bfloat16)
        start = time.perf_counter()
        cfg, ref, self.base = build_models(args.preset, self.device)
        vae = wan22_vae(self.device, cfg.latent_channel, full=args.preset != "tiny")
        self.tokenizer = build_tokenizer()
        scheduler = UniPCMultistepScheduler.from_config(SCHEDULE)
        self.pipe = Cosmos3OmniPipeline(
            transformer=ref, text_tokenizer=self.tokenizer, vae=vae, scheduler=scheduler, enable_safety_checker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.codec = VideoCodec(vae, cfg.latent_channel)
        self.schedule = Schedule(dict(scheduler.config))
        self.generators: dict[tuple, Generator] = {}
        self.record: dict = {
            "meta": {**environment(self.device), "preset": args.preset, "command": " ".join(sys.argv)},
            "probe": {},
            "runs": [],
            "rows": [],
            "sdpa_at_start": sdpa_at_start,
            "diffusers_sdpa": [],  # sdpa_choice before each diffusers request
        }
        self.out = args.out
        self.diffusers_sdpa = DIFFUSERS_SDPA[args.diffusers_sdpa]
        if self.diffusers_sdpa is not None:
            self.record["meta"]["diffusers_sdpa_backends"] = args.diffusers_sdpa
        cuda_sync()
        self.record["meta"]["build_s"] = round(time.perf_counter() - start, 1)
        print(f"models built in {self.record['meta']['build_s']} s", flush=True)

    def generator(self, v: Variant) -> Generator:
        """cosmos3 with `v`'s model switches, on the same weight tensors as every other variant: a module copy
        whose parameters and buffers are the base model's own (the deepcopy memo maps each to itself), then the
        switches as `cosmos3.load` applies them (`speed_up_generation`; FP8 adds its copy of the generation
        linears)."""
        key = (v.fp8, v.compile, v.fp8_attention, v.flash_attention, v.cuda_graphs)
        if key not in self.generators:
            model = self.base
            if key != (False, False, False, False, False):
                shared = {id(t): t for t in itertools.chain(self.base.parameters(), self.base.buffers())}
                model = copy.deepcopy(self.base, memo=shared)
                speed_up_generation(
                    model,
                    self.device,
                    fp8=v.fp8,
                    fp8_attention=v.fp8_attention,
                    flash_attention=v.flash_attention,
                    compile=v.compile,
                    one_gpu=self.device.type == "cuda",  # as the Engine: compile="auto" is off on the CPU
                    cuda_graphs=v.cuda_graphs,
                )
            parts = Parts(
                transformer=model, video=self.codec, sound=None, tokenizer=self.tokenizer, schedule=self.schedule
            )
            self.generators[key] = Generator(parts)
        return self.generators[key]

    def runner(self, name: str, w: Workload, steps: int) -> Callable[[Callable[[], None]], tuple[torch.Tensor, int]]:
        """A whole request, decode included: (mark at each step's end) -> (final latents, steps computed)."""
        v = VARIANTS[name]
        if v is None:
            req = make_request(w, steps)  # outside the timed call, as for cosmos3
            return lambda mark: self.run_diffusers(req, mark)
        gen, req = self.generator(v), make_request(w, steps, v.step_cache)

        def run(mark: Callable[[], None]) -> tuple[torch.Tensor, int]:
            out = gen.generate(req, progress=False, on_step=lambda i, n: mark())
            return out.latents, int(out.metadata.get("computed_steps", steps))

        return run

    def run_diffusers(self, req: GenerateRequest, mark: Callable[[], None]) -> tuple[torch.Tensor, int]:
        """The reference pipeline with the fields `tests/test_generator_parity.py` passes (there its latents equal
        cosmos3's to 1e-4 in fp32); the final latents are taken by the step callback, so the request still
        decodes and postprocesses its frames as a user's would."""
        final: dict[str, torch.Tensor] = {}

        def backends():
            return contextlib.nullcontext() if self.diffusers_sdpa is None else sdpa_kernel(self.diffusers_sdpa)

        with backends():
            self.record["diffusers_sdpa"].append(sdpa_choice(self.device, self.base.dtype))
        channels_last_weights(self.pipe.vae, False)  # diffusers' own layout (cosmos3's decode makes them channels-last)

        def keep(pipe, i: int, t, kwargs: dict) -> dict:
            final["latents"] = kwargs["latents"].clone()
            mark()
            return {}

        kwargs = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            num_frames=req.num_frames,
            height=req.height,
            width=req.width,
            fps=req.fps,
            num_inference_steps=req.num_steps,
            guidance_scale=req.guidance,
            generator=torch.Generator().manual_seed(req.seed),
            use_system_prompt=req.use_system_prompt,
            add_resolution_template=req.use_resolution_template,
            add_duration_template=req.use_duration_template,
            output_type="np",
            callback_on_step_end=keep,
        )
        if req.mode == "image2video":
            kwargs["image"] = req.image
        with backends():  # only the backends' on/off flags, restored after; torch's priority order stays as it is
            self.pipe(**kwargs)
        return final["latents"], req.num_steps

    def timed_run(
        self, wname: str, name: str, w: Workload, steps: int, warmup: bool = False
    ) -> tuple[Run, torch.Tensor]:
        seconds, peak, latents, computed, ends = timed(self.runner(name, w, steps))
        run = Run(wname, name, steps, computed, round(seconds, 3), round(peak, 2), warmup, ends)
        self.record["runs"].append(asdict(run))
        write_json(self.record, self.out)
        durations = step_durations(run)
        shown = {k: v for k, v in asdict(run).items() if k != "step_ends"}  # every step end is in --out
        print(json.dumps({**shown, "step_median_s": round(statistics.median(durations), 4) if durations else None}))
        return run, latents

    def probe(self, names: list[str], w: Workload) -> None:
        """Step-cache variants at 35 steps on a small video against the exact path: the steps they compute (used to
        project their 35-step time where a workload does not run 35 steps) and how far their latents move."""
        self.record["probe_size"] = f"{w.width}x{w.height} x {w.frames} frames"
        print(f"probe: {TARGET_STEPS} steps, {self.record['probe_size']}", flush=True)
        for name in ["exact", *names]:
            self.timed_run("probe", name, w, 1, warmup=True)  # compiles the probe's shape, not timed
        settle_compile_workers()
        _, exact = self.timed_run("probe", "exact", w, TARGET_STEPS)
        for name in names:
            run, latents = self.timed_run("probe", name, w, TARGET_STEPS)
            err = float((latents - exact).norm() / exact.norm())
            self.record["probe"][name] = {"computed": run.computed, "s": run.s, "rel_err": round(err, 4)}
            print(json.dumps({"probe": name, **self.record["probe"][name]}), flush=True)
        write_json(self.record, self.out)

    def workload(self, wname: str, w: Workload, names: list[str], steps: tuple[int, int], repeat: int) -> None:
        # A step-cache variant whose variant without the cache also runs, at step counts where the cache can skip
        # nothing, would repeat that variant's runs exactly: it reuses them instead (saves ~70 s per 720p workload).
        same = {}
        for name in names:
            v = VARIANTS[name]
            if v is not None and v.step_cache is not None and max(steps) <= ALWAYS_COMPUTED:
                twin = next((n for n in names if VARIANTS[n] == v.without_cache()), None)
                if twin is not None:
                    same[name] = twin
        measured = [n for n in names if n not in same]
        warm: dict[str, float] = {}
        for name in measured:  # at n_lo; with one step count at 1 step (it compiles the same shapes)
            warm[name] = self.timed_run(wname, name, w, steps[0] if len(steps) == 2 else 1, warmup=True)[0].s
        if any(VARIANTS[n] is not None and VARIANTS[n].compile for n in measured):
            settle_compile_workers()
        runs: dict[str, dict[int, list[Run]]] = {n: {s: [] for s in steps} for n in measured}
        latents: dict[str, dict[int, torch.Tensor]] = {n: {} for n in measured}
        for n_steps in steps:
            for _ in range(repeat):
                for name in measured:  # interleaved: every variant under the same clocks
                    run, x = self.timed_run(wname, name, w, n_steps)
                    runs[name][n_steps].append(run)
                    latents[name][n_steps] = x
        for name, twin in same.items():
            runs[name], latents[name], warm[name] = runs[twin], latents[twin], warm[twin]
        exact = latents.get("exact")
        for name in names:
            row = summarise(wname, name, steps, runs[name], warm[name], self.record["probe"].get(name))
            row["shared_runs_with"] = same.get(name)
            if exact is not None:
                for key, n in (("rel_err", steps[-1]), ("rel_err_lo", steps[0])):
                    row[key] = round(float((latents[name][n] - exact[n]).norm() / exact[n].norm()), 4)
            self.record["rows"].append(row)
        add_ratios(self.record["rows"])
        write_json(self.record, self.out)
        for row in self.record["rows"]:
            if row["workload"] == wname:
                print(json.dumps(row), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def summarise(wname: str, name: str, steps: tuple[int, ...], runs: dict[int, list[Run]], warm_s: float, probe) -> dict:
    """Seconds at each step count (medians), per-step and fixed cost, and the 35-step request time. With two step
    counts the per-step time is the fit of the docstring, and "s_step_timed" (the median step of the n_hi request,
    timed in it) checks it; with one count the per-step time is that median step and fixed = t - n * per-step."""
    cached = VARIANTS[name] is not None and VARIANTS[name].step_cache is not None
    times = {n: statistics.median(r.s for r in runs[n]) for n in steps}
    computed = {n: runs[n][0].computed for n in steps}
    hi = steps[-1]
    durations = [d for r in runs[hi] for d in step_durations(r)]
    timed_step = statistics.median(durations) if durations and not cached else math.nan
    if len(steps) == 2:
        lo = steps[0]
        c_lo, c_hi = computed[lo], computed[hi]
        per_step = (times[hi] - times[lo]) / (c_hi - c_lo) if c_hi != c_lo else math.nan
        fixed = times[lo] - c_lo * per_step
        one_step = times[lo] - (c_lo - 1) * per_step
    else:  # a step-cache variant's skipped steps are not model steps: no per-step figure from its steps' median
        per_step, fixed = timed_step, times[hi] - computed[hi] * timed_step
        one_step = fixed + per_step
    if TARGET_STEPS in steps:  # measured, not projected
        c35, s35 = computed[TARGET_STEPS], times[TARGET_STEPS]
    else:
        c35 = (probe["computed"] if probe else None) if cached else TARGET_STEPS
        s35 = fixed + c35 * per_step if c35 is not None else math.nan
    return dict(
        workload=wname,
        variant=name,
        steps=list(steps),
        s_lo=round(times[steps[0]], 3) if len(steps) == 2 else None,
        s_hi=round(times[hi], 3),
        s_per_step=rounded(per_step, 4),
        s_step_timed=rounded(timed_step, 4),
        fixed_s=rounded(fixed, 3),
        s_35=rounded(s35, 2),
        computed_35=c35,
        warmup_s=round(warm_s, 2),
        # The warm-up runs at n_lo (one count: at 1 step): beyond a warm request of as many steps, it is the
        # compile (and first-call setup).
        compile_s=rounded(warm_s - (times[steps[0]] if len(steps) == 2 else one_step), 2),
        peak_gib=max(r.peak_gib for n in steps for r in runs[n]),
    )


def rounded(x: float, digits: int) -> float | None:
    """None for what could not be measured (NaN is not JSON)."""
    return None if math.isnan(x) else round(x, digits)


def add_ratios(rows: list[dict]) -> None:
    """cosmos3 / diffusers for the per-step time, the fixed cost and the 35-step time, per workload."""
    ref = {r["workload"]: r for r in rows if r["variant"] == "diffusers"}
    for row in rows:
        d = ref.get(row["workload"])
        for key in ("s_per_step", "fixed_s", "s_35"):
            ok = d is not None and bool(d[key]) and row[key] is not None
            row[f"ratio_{key}"] = round(row[key] / d[key], 3) if ok else None


def estimate(names: list[str], plan: dict[str, tuple[int, int]], repeat: int, probe: bool) -> float:
    """Seconds the run should take on an H100/H200 (module constants say where each figure comes from)."""
    total = SETUP_S
    shapes = [(w, plan[w]) for w in plan] + ([("probe", (1, TARGET_STEPS))] if probe else [])
    for wname, steps in shapes:
        d_step, c_step, d_fixed, c_fixed = ANCHORS.get(wname, (0.0, 0.0, 0.0, 0.0))
        warmup = steps[0] if len(steps) == 2 else 1
        counts = [warmup] + [n for n in steps for _ in range(repeat)]  # the warm-up, then the timed runs
        for name in names if wname != "probe" else ["exact"] + [n for n in names if is_cached(n)]:
            v = VARIANTS[name]
            if v is None:
                total += sum(d_fixed + n * d_step for n in counts)
                continue
            if wname != "probe" and v.step_cache is not None and max(steps) <= ALWAYS_COMPUTED:
                if v.without_cache() in [VARIANTS[n] for n in names]:
                    continue  # reuses its twin's runs
            step = c_step * STEP_FACTOR[(v.fp8, bool(v.compile))]
            frac = CACHE_FRACTION if v.step_cache is not None else 1.0
            total += sum(c_fixed + n * step * (frac if n > ALWAYS_COMPUTED else 1.0) for n in counts)
            total += COMPILE_S if v.compile else 0.0
    return total


def is_cached(name: str) -> bool:
    v = VARIANTS[name]
    return v is not None and v.step_cache is not None


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def complete_rows(records: list[dict]) -> None:
    """Step-cache rows of a run without the probe (`--no-probe`, to fit a call's time) get their 35-step
    projection from another record's probe; then every record's ratios are recomputed."""
    probes = {name: (p, rec["probe_size"]) for rec in records for name, p in rec.get("probe", {}).items()}
    for rec in records:
        for row in rec["rows"]:
            if row["computed_35"] is None and row["variant"] in probes and row["s_per_step"] is not None:
                p, size = probes[row["variant"]]
                row["computed_35"] = p["computed"]
                row["s_35"] = round(row["fixed_s"] + p["computed"] * row["s_per_step"], 2)
                rec.setdefault("probe", {})[row["variant"]] = p
                rec["probe_size"] = size
        add_ratios(rec["rows"])


# The SDPA backends diffusers' requests may use (`--diffusers-sdpa`). torch picks the first usable backend of its
# priority order: cuDNN first on Hopper/Blackwell where torch's cuDNN is 9.15 or newer (torch 2.11's CUDA 13 wheels
# bring 9.19), flash first with older cuDNN (CUDA 12 wheels), on purpose (pytorch#169849). "flash" turns cuDNN off
# for diffusers' calls, giving the choice torch makes on such an install; it sets only the backends' on/off flags
# and restores them (never the priority order, whose save-and-restore once slowed every later call: README).
DIFFUSERS_SDPA = {"torch": None, "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}
DIFFUSERS_SDPA_HELP = {
    "torch": "torch's own choice on this machine (the default)",
    "flash": "cuDNN off, as torch chooses where its cuDNN is older than 9.15 (CUDA 12 wheels)",
}


def sdpa_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The SDPA backend torch picks, in this process's state now, for a call shaped as diffusers' generation
    attention makes it (32 query heads on 8 KV heads of 128, grouped, from permuted views). Recorded at the start
    and before each diffusers request: cosmos3 once changed torch's process-global choice for diffusers' attention
    from cuDNN to flash (its 720p step 9.2 s instead of 6.5 s; benchmarks/README.md, "2026-12-03, night"), and the
    table says so if diffusers ever runs on another backend than a process of its own would give it."""
    q = torch.zeros(1, 256, 32, 128, device=device, dtype=dtype).permute(0, 2, 1, 3)
    kv = torch.zeros(1, 300, 8, 128, device=device, dtype=dtype).permute(0, 2, 1, 3)
    return SDPBackend(torch._fused_sdp_choice(q, kv, kv, None, 0.0, False, enable_gqa=True)).name


def print_tables(records: list[dict]) -> None:
    """The Markdown table (README format) of one or more runs' JSON records, with what each was measured on."""
    complete_rows(records)
    for rec in records:
        m = rec["meta"]
        print(f"{m['gpu']}, torch {m['torch']}, diffusers {m['diffusers']}, {m['date']} (`{m['command']}`)")
    print()
    header = ["workload", "variant", "steps", "s (lo)", "s (hi)", "s/step", "s/step timed", "fixed s", "35-step s"]
    header += ["ratio s/step", "ratio fixed", "ratio 35-step", "warm-up s", "peak GiB", "rel. err vs exact"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" if i < 3 else "---:" for i in range(len(header))) + " |")
    notes = set()
    for rec in records:
        for r in rec["rows"]:
            s35 = fmt(r["s_35"])
            if is_cached(r["variant"]) and TARGET_STEPS not in r["steps"] and r["computed_35"] is not None:
                s35 += f" ({r['computed_35']}/{TARGET_STEPS})"
                notes.add("cache")
            if r.get("shared_runs_with"):
                notes.add(f"{r['variant']}={r['shared_runs_with']}")
            steps = ", ".join(str(n) for n in r["steps"])
            cells = [r["workload"], r["variant"], steps, fmt(r.get("s_lo")), fmt(r["s_hi"])]
            cells += [fmt(r["s_per_step"]), fmt(r.get("s_step_timed")), fmt(r["fixed_s"]), s35]
            cells += [fmt(r[f"ratio_{k}"]) for k in ("s_per_step", "fixed_s", "s_35")]
            cells += [fmt(r["warmup_s"]), fmt(r["peak_gib"]), fmt(r.get("rel_err"))]
            print("| " + " | ".join(cells) + " |")
    for rec in records:  # older records have none
        if rec.get("diffusers_sdpa"):
            counts = {name: rec["diffusers_sdpa"].count(name) for name in sorted(set(rec["diffusers_sdpa"]))}
            print(f"\ndiffusers' SDPA backend (torch's choice) at its requests: {counts}")
            start = rec.get("sdpa_at_start")
            forced = rec["meta"].get("diffusers_sdpa_backends")
            if forced is not None:
                print(f"diffusers ran with --diffusers-sdpa {forced}: {DIFFUSERS_SDPA_HELP[forced]}")
            elif start is not None and set(counts) != {start}:
                print(f"WARNING: a fresh process's choice is {start}: diffusers' rows are not what a user gets")
    for note in sorted(notes):
        if note == "cache":
            print(f"\n(n/{TARGET_STEPS}): the steps a step-cache variant computes of {TARGET_STEPS}, from the probe:")
            lines = {
                f"- {name}: {p['computed']}/{TARGET_STEPS} steps at {rec['probe_size']}, {p['s']} s, "
                f"latents {p['rel_err']} from the exact path's at {TARGET_STEPS} steps"
                for rec in records
                for name, p in rec.get("probe", {}).items()
            }
            print("\n".join(sorted(lines)))
        else:
            name, twin = note.split("=")
            print(f"\n{name}: at 3 steps or fewer the step cache skips none, so its runs are {twin}'s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--workloads", nargs="+", default=["t2i-720p", "t2v-480p", "t2v-720p", "i2v-720p"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        help="n_lo n_hi for every workload (default: per workload); one count N: whole N-step requests only, the "
        "per-step time from the steps timed inside them",
    )
    parser.add_argument("--quick", action="store_true", help="video at 1 and 2 steps")
    parser.add_argument("--repeat", type=int, default=1, help="timed requests per step count (median)")
    parser.add_argument("--no-probe", action="store_true", help="skip the 35-step probe of step-cache variants")
    parser.add_argument(
        "--diffusers-sdpa",
        default="torch",
        choices=list(DIFFUSERS_SDPA),
        help="; ".join(f"{k}: {v}" for k, v in DIFFUSERS_SDPA_HELP.items()),
    )
    parser.add_argument("--out", help="JSON record, rewritten after every request")
    parser.add_argument(
        "--budget-s", type=float, help="skip a workload whose estimated time would end the run past this many seconds"
    )
    parser.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of earlier --out files")
    args = parser.parse_args()
    if args.table:
        records = []
        for path in args.table:
            with open(path) as f:
                records.append(json.load(f))
        print_tables(records)
        return
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    names = list(dict.fromkeys(args.variants))
    if default_device().type != "cuda":  # FP8 matmuls need Hopper or newer (cosmos3.model.fp8)
        dropped = [n for n in names if VARIANTS[n] is not None and VARIANTS[n].fp8]
        names = [n for n in names if n not in dropped]
        if dropped:
            print(f"no GPU: skipping {', '.join(dropped)}", flush=True)
    # diffusers, then cosmos3's exact path (the reference point of every error), then the rest in the order given.
    names = [n for n in ("diffusers", "exact") if n in names] + [n for n in names if n not in ("diffusers", "exact")]
    plan = {}
    for wname in args.workloads:
        w = WORKLOADS[wname]
        steps = tuple(args.steps) if args.steps else (w.quick_steps if args.quick else w.steps)
        if len(steps) not in (1, 2) or min(steps) < 1 or (len(steps) == 2 and steps[0] >= steps[1]):
            parser.error(f"--steps takes n_lo < n_hi or one count, all at least 1; got {list(steps)}")
        plan[wname] = steps
    cached = [n for n in names if is_cached(n)]
    probe = bool(cached) and "exact" in names and not args.no_probe
    probe = probe and any(TARGET_STEPS not in s for s in plan.values())
    if args.preset == "nano":
        est = estimate(names, plan, args.repeat, probe)
        print(f"estimated {est:.0f} s ({est / 60:.1f} min) on an H100/H200, model build included", flush=True)
    print(f"variants: {', '.join(names)}; workloads: {plan}", flush=True)

    started = time.perf_counter()
    with torch.inference_mode():
        bench = Bench(args)
        if probe:
            bench.probe(cached, TINY_PROBE if args.preset == "tiny" else PROBE)
        skipped, estimated, spent = [], 0.0, 0.0
        for wname, steps in plan.items():
            cost = estimate(names, {wname: steps}, args.repeat, False) - SETUP_S
            # Scaled by how much longer than estimated the workloads so far took (never down: an estimate too low
            # costs a killed call, one too high only a skipped workload).
            cost *= max(1.0, spent / estimated) if estimated else 1.0
            if args.budget_s and time.perf_counter() - started + cost > args.budget_s:
                skipped.append(wname)  # better its rows missing than every row of a call that ran out of time
                print(f"skipping {wname}: ~{cost:.0f} s would pass --budget-s {args.budget_s:.0f}", flush=True)
                continue
            begun = time.perf_counter()
            bench.workload(wname, WORKLOADS[wname], names, steps, args.repeat)
            spent += time.perf_counter() - begun
            estimated += estimate(names, {wname: steps}, args.repeat, False) - SETUP_S
        bench.record["skipped"] = skipped
        write_json(bench.record, args.out)
    print(f"\n{time.perf_counter() - started:.0f} s in all" + (f"; skipped: {' '.join(skipped)}" if skipped else ""))
    print()
    print_tables([bench.record])


if __name__ == "__main__":
    main()
