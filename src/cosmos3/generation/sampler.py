"""The flow-matching loop: UniPC schedule with `shift`, classifier-free guidance, one scheduler per modality."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from cosmos3.errors import Cancelled, RequestError
from cosmos3.generation.pass_graph import PassGraph, graphable
from cosmos3.generation.request import GenerateRequest
from cosmos3.model.sequence import Packed
from cosmos3.parallel.collectives import all_gather_tensors, leader_flags
from cosmos3.parallel.layout import SINGLE, Groups


@dataclass
class Stream:
    """One denoised modality: its latents (fp32, kept across steps) and which of its frames are clean."""

    name: str  # "vision" | "sound" | "action"
    latents: torch.Tensor
    clean_frames: list[int] = field(default_factory=list)
    keep_channels: int | None = None  # action: channels past the embodiment's width stay exactly 0

    @property
    def all_clean(self) -> bool:
        frames = self.latents.shape[2] if self.name == "vision" else self.latents.shape[0]
        return len(set(self.clean_frames)) >= frames


class StepCache:
    """Opt-in step caching (TeaCache-style): while the noisy input has changed by less than `threshold` (relative L1,
    accumulated since the last computed step), reuse the last velocities instead of running the model. The first
    two and the last step are always computed, and at most `max_skips` steps in a row are reused."""

    def __init__(self, threshold: float, steps: int, max_skips: int = 2):
        self.threshold, self.steps, self.max_skips = threshold, steps, max_skips
        self.previous: torch.Tensor | None = None
        self.accumulated = 0.0
        self.skipped_in_row = 0
        self.computed = 0

    def compute(self, step: int, latents: torch.Tensor) -> bool:
        if self.previous is not None:
            change = (latents - self.previous).abs().mean() / self.previous.abs().mean().clamp(min=1e-12)
            self.accumulated += float(change)
        self.previous = latents.clone()
        must = step < 2 or step == self.steps - 1 or self.skipped_in_row >= self.max_skips
        if must or self.accumulated >= self.threshold:
            self.accumulated, self.skipped_in_row = 0.0, 0
            self.computed += 1
            return True
        self.skipped_in_row += 1
        return False


def make_scheduler(config: dict, num_steps: int, shift: float | None, native_schedule: bool, device):
    from diffusers import UniPCMultistepScheduler

    name = config.get("_class_name", "UniPCMultistepScheduler")
    if name != "UniPCMultistepScheduler":
        raise ValueError(
            f"scheduler {name!r} (distilled checkpoints) is not supported yet; supported: UniPCMultistepScheduler"
        )
    # An explicit shift must take effect: the Karras branch of the scheduler ignores flow_shift, so it is turned
    # off, as the documents do whenever they set flow_shift.
    overrides = {"flow_shift": float(shift), "use_karras_sigmas": False} if shift is not None else {}
    scheduler = UniPCMultistepScheduler.from_config(config, **overrides)
    if native_schedule:
        sigmas = np.linspace(1.0 - 1.0 / scheduler.config.num_train_timesteps, 0.0, num_steps + 1)[:-1]
        scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas)
    else:
        scheduler.set_timesteps(num_steps, device=device)
    # UniPC finds its first step by looking the first timestep up, and where that integer timestep occurs twice it
    # starts at the second occurrence (meant for img2img), then runs out of steps on the last one (a bare
    # `assert this_order > 0`). Timesteps are int(1000 * sigma), so the first two coincide once the shifted sigmas
    # are closer than 1/1000 near sigma=1: above about num_train_timesteps / flow_shift steps (100 at shift 10).
    # Every step of this loop runs from the first timestep, so the start is fixed at index 0; where no timestep
    # repeats that is the index the lookup finds, so results are unchanged.
    scheduler.set_begin_index(0)
    sigmas = scheduler.sigmas
    if bool((sigmas[:-1] == sigmas[1:]).any()):  # UniPC divides by their log-SNR difference
        raise RequestError(
            "num_steps",
            num_steps,
            f"fewer steps or a smaller shift (with shift={scheduler.config.flow_shift:g} consecutive noise levels "
            "coincide in float32 and the solver would divide by zero)",
        )
    return scheduler


def as_velocities(v_vision, v_sound, v_action) -> dict[str, torch.Tensor]:
    out = {"vision": v_vision[None].float()}
    if v_sound is not None:
        out["sound"] = v_sound.float()
    if v_action is not None:
        out["action"] = v_action.float()
    return out


@dataclass
class Denoising:
    """One request inside the loop: its prompts (packs: conditional, unconditional), streams and step callback."""

    packs: list[Packed]
    streams: list[Stream]
    req: GenerateRequest
    on_step: Callable[[int, int], None] | None = None
    cancelled: bool = False
    computed_steps: int = 0  # model evaluations (fewer than steps with step_cache), set by denoise
    branches: list[int] = field(default_factory=list)  # which packs this rank evaluates (CFG parallel: one)
    schedulers: dict = field(default_factory=dict)
    caches: list = field(default_factory=list)
    velocities: dict[str, torch.Tensor] = field(default_factory=dict)

    def latents(self) -> dict[str, torch.Tensor]:
        return {s.name: s.latents for s in self.streams}


@dataclass(frozen=True)
class Schedule:
    """The checkpoint's scheduler config and whether it uses the native flow sigmas (model_index.json)."""

    config: dict
    native: bool = False

    def scheduler(self, num_steps: int, shift: float | None, device):
        return make_scheduler(self.config, num_steps, shift, self.native, device)


def denoise(model, schedule: Schedule, jobs: list[Denoising], progress: bool = True, groups: Groups = SINGLE) -> None:
    """Denoise several requests of one shape and schedule together: each step is one model pass over every
    request's branches. A job whose `on_step` raises `Cancelled` leaves the batch (its `cancelled` is set); the
    others go on. Latents are updated in place in each job's streams.

    With CFG parallel (`groups.cfg`), each of the two ranks runs one branch of every guided request and the
    velocities are exchanged once per step; every rank then steps the same latents, so all stay equal."""
    device = model.proj_in.weight.device
    dtype = model.dtype
    first = jobs[0].req
    scheduler = schedule.scheduler(first.num_steps, first.shift, device)
    timesteps = scheduler.timesteps
    step_cache = StepCache(first.step_cache, len(timesteps)) if first.step_cache else None
    if step_cache is not None and len(jobs) > 1:
        raise ValueError("step_cache runs one request at a time")
    for job in jobs:
        # UniPC keeps a history per instance, so every modality of every request steps its own copy.
        job.schedulers = {s.name: copy.deepcopy(scheduler) for s in job.streams}
        job.packs = job.packs[: 2 if job.req.guidance != 1.0 else 1]
        job.velocities = {}
    split_cfg = groups.cfg is not None and all(len(job.packs) == 2 for job in jobs)
    for job in jobs:
        job.branches = [groups.cfg_rank] if split_cfg else list(range(len(job.packs)))
        # The prompts' keys/values, the same at every step.
        job.caches = [model.und_cache(job.packs[b]) for b in job.branches]
    rows = sum(job.packs[b].seq_len - job.packs[b].und_len for job in jobs for b in job.branches)
    graph = PassGraph(model) if graphable(model, rows) else None
    bar = tqdm(total=len(timesteps), desc="denoising", unit="step", disable=not progress)
    for i, t in enumerate(timesteps):
        active = [job for job in jobs if not job.cancelled]
        if not active:
            break
        if step_cache is None or step_cache.compute(i, active[0].streams[0].latents):
            _velocities(graph or model.forward_gen, active, t, dtype, groups.cfg if split_cfg else None)
            for job in active:
                job.computed_steps += 1
        for job in active:
            _step(job, i, t, len(timesteps), copy_velocities=step_cache is not None)
        if groups.distributed:  # the leader's clients decide cancellation; every rank must stop together
            agreed = leader_flags([job.cancelled for job in active], device)
            for job, cancelled in zip(active, agreed, strict=True):
                job.cancelled = cancelled
        bar.update()
    bar.close()


def _velocities(
    forward_gen: Callable,
    active: list[Denoising],
    t: torch.Tensor,
    dtype: torch.dtype,
    cfg_group: dist.ProcessGroup | None,
) -> None:
    """One model pass (`forward_gen`: the model's, or a `PassGraph` of it) over every branch of every active request
    (with CFG parallel: this rank's branch of each, then the other rank's velocities gathered); CFG combines each
    request's branches."""
    branches = [(job, job.packs[b], c) for job in active for b, c in zip(job.branches, job.caches, strict=True)]
    inputs = {id(job): {s.name: s.latents.to(dtype) for s in job.streams} for job in active}
    if len(active) == 1:  # one request: its branches share the noisy tokens (embedded once)
        only = inputs[id(active[0])]
        vision, sound, action = only["vision"][0], only.get("sound"), only.get("action")
    else:
        vision = [inputs[id(job)]["vision"][0] for job, _, _ in branches]
        sound = [inputs[id(job)].get("sound") for job, _, _ in branches]
        action = [inputs[id(job)].get("action") for job, _, _ in branches]
    # All branches in one pass (see Cosmos3Transformer.forward_gen); t stays on the device.
    outs = forward_gen([p for _, p, _ in branches], [c for _, _, c in branches], vision, t, sound, action)
    if cfg_group is not None:  # this rank's branch of every request -> both branches of every request, in order
        present = [[x is not None for x in out] for out in outs]
        by_rank = all_gather_tensors([x for out in outs for x in out if x is not None], cfg_group)
        gathered = []
        for rank_tensors in by_rank:  # rank 0 holds the conditional branches, rank 1 the unconditional ones
            pieces = iter(rank_tensors)
            gathered.append([tuple(next(pieces) if p else None for p in mask) for mask in present])
        outs = [gathered[r][k] for k in range(len(present)) for r in range(len(by_rank))]
    start = 0
    for job in active:
        v = as_velocities(*outs[start])
        if len(job.packs) == 2:
            uncond = as_velocities(*outs[start + 1])
            v = {k: uncond[k] + job.req.guidance * (v[k] - uncond[k]) for k in v}
        job.velocities = v
        start += len(job.packs)


def _step(job: Denoising, i: int, t: torch.Tensor, steps: int, copy_velocities: bool) -> None:
    """Advance each of the job's streams by one scheduler step, then report progress (which may cancel it)."""
    v = {k: x.clone() for k, x in job.velocities.items()} if copy_velocities else job.velocities
    for s in job.streams:
        # Forward-dynamics actions are all given: the reference never steps their scheduler. An all-clean
        # vision stream (inverse dynamics) is still stepped with zero velocity, as the reference does.
        if s.name == "action" and s.all_clean:
            continue
        vel = v[s.name]
        if s.keep_channels is not None:
            vel[..., s.keep_channels :] = 0
        s.latents = job.schedulers[s.name].step(vel[None], t, s.latents[None], return_dict=False)[0][0]
        if s.keep_channels is not None:
            s.latents[..., s.keep_channels :] = 0
    if job.on_step is not None:
        try:
            job.on_step(i + 1, steps)
        except Cancelled:
            job.cancelled = True
