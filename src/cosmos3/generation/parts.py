"""The loaded pieces every generation mode uses: our transformer, the codecs, the tokenizer and the schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosmos3.generation import text
from cosmos3.generation.codecs import SoundCodec, VideoCodec
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.sampler import Schedule
from cosmos3.parallel.layout import SINGLE, Groups


@dataclass
class Parts:
    transformer: torch.nn.Module  # cosmos3.model.transformer.Cosmos3Transformer
    video: VideoCodec
    sound: SoundCodec | None
    tokenizer: object
    schedule: Schedule
    default_use_system_prompt: bool = True  # model_index.json; on for released checkpoints
    groups: Groups = SINGLE  # this process's place in a parallel layout

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_in.weight.device

    def prompt_ids(self, req: GenerateRequest, height: int, width: int) -> tuple[list[int], list[int]]:
        """Token ids of the conditional and the unconditional prompt, templates and system prompt applied."""
        use_system = self.default_use_system_prompt if req.use_system_prompt is None else req.use_system_prompt
        system = (text.SYSTEM_PROMPT_IMAGE if req.num_frames == 1 else text.SYSTEM_PROMPT_VIDEO) if use_system else None
        negative = req.negative_prompt or ""
        if req.is_action:
            cond = text.action_caption(
                req.prompt,
                view_point=req.view_point,
                num_frames=req.num_frames,
                fps=req.fps,
                height=height,
                width=width,
            )
            uncond = negative
        else:
            meta = dict(
                num_frames=req.num_frames,
                height=height,
                width=width,
                fps=req.fps,
                duration_template=req.use_duration_template,
                resolution_template=req.use_resolution_template,
            )
            cond = text.with_metadata(req.prompt, negative=False, **meta)
            uncond = text.with_metadata(negative, negative=True, **meta)
        return (
            text.generation_input_ids(self.tokenizer, cond, system),
            text.generation_input_ids(self.tokenizer, uncond, system),
        )
