"""The Generator: admit a request, then prepare -> denoise -> finish, for every mode; guardrails in one place."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from cosmos3.errors import Cancelled, RequestError
from cosmos3.generation import actions, vision
from cosmos3.generation.parts import Parts
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.result import GenerationResult
from cosmos3.generation.sampler import denoise
from cosmos3.guardrails import Guardrail, check_output, check_prompt

OnStep = Callable[[int, int], None]


def batch_key(req: GenerateRequest) -> tuple | None:
    """Requests with the same key can share denoising passes (`Generator.generate_batch`); None: never batched."""
    if req.mode not in ("text2image", "text2video") or req.step_cache is not None:
        return None
    return (req.mode, req.height, req.width, req.num_frames, req.fps, req.num_steps, req.shift, req.enable_sound)


class Generator:
    """Runs resolved generation requests on the loaded parts."""

    def __init__(self, parts: Parts, guardrail: Guardrail | None = None):
        self.parts = parts
        self.guardrail = guardrail

    def check_supported(self, req: GenerateRequest) -> None:
        """What this checkpoint can do: sound needs its codec and a sound-trained transformer, actions their tower."""
        cfg = self.parts.transformer.config
        if req.enable_sound and (self.parts.sound is None or not cfg.sound_gen):
            missing = "a sound_tokenizer" if self.parts.sound is None else "a transformer trained with sound_gen"
            raise RequestError("enable_sound", True, "false for this checkpoint", f"needs {missing}")
        if req.is_action:
            if not cfg.action_gen:
                raise RequestError(
                    "mode",
                    req.mode,
                    "text2image, text2video, image2video, video2video",
                    "needs a checkpoint with the action tower (action_gen)",
                )
            if req.raw_action_dim > cfg.action_dim:
                raise RequestError(
                    "domain_name",
                    req.domain_name,
                    f"a domain with at most {cfg.action_dim} channels",
                    f"has {req.raw_action_dim} action channels, more than the model's",
                )

    def _guardrail(self, req: GenerateRequest) -> Guardrail | None:
        return self.guardrail if req.enable_safety_check else None

    def generate(self, req: GenerateRequest, progress: bool = True, on_step: OnStep | None = None) -> GenerationResult:
        """Run one resolved request; raises RequestError for what it cannot do, Cancelled when `on_step` stops it."""
        outcome = self.generate_batch([req], [on_step], progress=progress)[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def generate_batch(
        self, reqs: list[GenerateRequest], on_steps: list[OnStep | None] | None = None, progress: bool = False
    ) -> list[GenerationResult | RequestError | Cancelled]:
        """Run requests of one shape and schedule (`batch_key`) in shared denoising passes; an action-mode request
        runs alone. Each request keeps its own outcome: its result, the RequestError that refused it (unsupported
        field, guardrail), or Cancelled when its `on_step` stopped it; the others are not affected."""
        refusals = self.admit(reqs)
        admitted = [i for i, refusal in enumerate(refusals) if refusal is None]
        on_steps = on_steps or [None] * len(reqs)
        outcomes: list = list(refusals)
        ran = self.run([reqs[i] for i in admitted], [on_steps[i] for i in admitted], progress)
        for i, outcome in zip(admitted, ran, strict=True):
            outcomes[i] = outcome
        return outcomes

    def admit(self, reqs: list[GenerateRequest]) -> list[RequestError | None]:
        """Each request's refusal (what the checkpoint cannot do, or the prompt guardrail's), or None."""
        if len(reqs) > 1:
            key = batch_key(reqs[0])
            if key is None or any(batch_key(r) != key for r in reqs):
                raise ValueError("generate_batch takes text2image / text2video requests of one shape and schedule")
        refusals: list[RequestError | None] = []
        for req in reqs:
            try:
                self.check_supported(req)
                check_prompt(self._guardrail(req), req.prompt)
            except RequestError as exc:
                refusals.append(exc)
            else:
                refusals.append(None)
        return refusals

    def run(
        self, reqs: list[GenerateRequest], on_steps: list[OnStep | None], progress: bool = False
    ) -> list[GenerationResult | RequestError | Cancelled]:
        """prepare -> denoise -> finish for admitted requests (see `admit`); the output guardrail at the end."""
        outcomes: list = [None] * len(reqs)
        if reqs and reqs[0].is_action:
            try:
                outcomes[0] = self._rollout(reqs[0], on_steps[0], progress)
            except RequestError as exc:  # unreadable media or actions
                outcomes[0] = exc
        elif reqs:
            jobs = {}
            for i, req in enumerate(reqs):
                try:
                    jobs[i] = vision.prepare(self.parts, req, on_steps[i])
                except RequestError as exc:  # unreadable media
                    outcomes[i] = exc
            if jobs:
                self._denoise(list(jobs.values()), progress)
            for i, job in jobs.items():
                outcomes[i] = Cancelled(reqs[i].name) if job.cancelled else vision.finish(self.parts, job)
        for req, outcome in zip(reqs, outcomes, strict=True):
            if isinstance(outcome, GenerationResult):
                guardrail = self._guardrail(req)
                outcome.video = check_output(guardrail, outcome.video)  # sound and actions are not checked
                outcome.metadata["guardrails"] = guardrail is not None
        return outcomes

    def _denoise(self, jobs, progress: bool) -> None:
        denoise(self.parts.transformer, self.parts.schedule, jobs, progress=progress, groups=self.parts.groups)

    def _rollout(self, req: GenerateRequest, on_step: OnStep | None, progress: bool) -> GenerationResult | Cancelled:
        rollout = actions.Rollout(self.parts, req)
        chained = req.chunks > 1
        for k in tqdm(range(req.chunks), desc="chunks", unit="chunk", disable=not (progress and chained)):
            job = rollout.prepare(k, on_step)
            self._denoise([job], progress=progress and not chained)
            if job.cancelled:
                return Cancelled(req.name)
            rollout.add(job)
        return rollout.result()
