"""Operator limits: what this server accepts, on top of the model's own bounds.

The request model (`cosmos3.generation.request.GenerateRequest.resolved`) holds the one set of bounds the model
has (steps, guidance, sizes, frame counts, ...). An operator caps work and input separately, here, so that one
server can refuse requests that would hold the GPU for hours or decode gigabytes; these caps are checked after a
request is resolved, when every default is known, and each refusal is a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cosmos3.errors import RequestError
from cosmos3.generation.request import RESOLUTIONS, GenerateRequest


@dataclass
class Limits:
    # Work per generation request.
    max_steps: int = 200
    max_frames: int = 300  # generated frames (chained chunks count in full)
    max_pixels: int = 1920 * 1088  # per generated frame: 1080p, its height rounded up to the VAE's 16
    max_prompt_chars: int = 20_000  # prompt and negative prompt, each
    # The Reasoner.
    max_tokens: int = 32768  # reply tokens: an operator's default (a request may ask up to 131,072)
    max_chat_chars: int = 200_000  # text over all messages of one conversation
    # Prompt tokens of one conversation, its media's included: bounds its prefill and KV cache (a prompt's characters
    # do not: 50,000 one-letter messages are ~350,000 tokens of chat template). 65,536 holds a minute of 720p video
    # at 2 frames a second (~53,000 tokens: 880 per frame pair) beside its text.
    max_prompt_tokens: int = 65_536
    # Conversations running or waiting for a row (each is read in a thread of the chat pool, this size); more are 429.
    # Two per decode row of the default --max-num-seqs 64: a full batch plus as many again prefilling or queued.
    max_pending_chats: int = 128
    # Inputs: every upload, URL and data URI, and what it decodes to.
    max_upload_bytes: int = 512 * 2**20
    max_input_pixels: int = 3840 * 2160  # per decoded frame
    max_input_frames: int = 1800
    max_input_seconds: float = 120.0
    max_body_bytes: int | None = None  # None: one base64-encoded upload plus 1 MiB

    @property
    def body_bytes(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_upload_bytes * 4 // 3 + 2**20

    def check_request(self, req: GenerateRequest) -> None:
        """A resolved request against the work caps; RequestError names the field."""
        self.check_prompt(req.prompt, "prompt")
        if req.negative_prompt:
            self.check_prompt(req.negative_prompt, "negative_prompt")
        _at_most("num_steps", req.num_steps, self.max_steps)
        frames = (req.num_frames or 1) * max(1, req.chunks)
        if frames > self.max_frames:
            field = "chunks" if req.chunks > 1 else "num_frames"
            raise RequestError(
                field, getattr(req, field), f"at most {self.max_frames} frames in all", "exceeds this server's limit"
            )
        width, height = req.width, req.height
        if width is None or height is None:  # action modes: the tier's canvas (its aspect follows the input)
            width, height = min(RESOLUTIONS.get(str(req.resolution), {"": (1280, 704)}).values(), key=_area)
        if width * height > self.max_pixels:
            raise RequestError(
                "size",
                f"{width}x{height}",
                f"at most {self.max_pixels} pixels per frame",
                "exceeds this server's limit",
            )

    def check_prompt(self, text: Any, field: str) -> None:
        if isinstance(text, str) and len(text) > self.max_prompt_chars:
            raise RequestError(
                field, f"<{len(text)} characters>", f"at most {self.max_prompt_chars} characters", "is too long"
            )

    def check_tokens(self, max_tokens: int) -> None:
        _at_most("max_tokens", max_tokens, self.max_tokens)


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def _at_most(field: str, value: Any, limit: int) -> None:
    if isinstance(value, (int, float)) and value > limit:
        raise RequestError(field, value, f"at most {limit} on this server", "exceeds this server's limit")
