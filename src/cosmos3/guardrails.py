"""Safety checks: the prompt before generation, the decoded video after it. Sound is not checked (as documented).

One interface, two implementations: `CosmosGuardrail` (the `cosmos_guardrail` package, the default when a
checkpoint enables its safety checker) and any object with the same two methods, passed to `cosmos3.load`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from cosmos3.errors import RequestError

INSTALL_HINT = (
    "install it with `pip install cosmos_guardrail` (its models are fetched from the Hugging Face hub, so put them "
    "in the local cache first on machines without network), or turn guardrails off knowingly: "
    "cosmos3.load(..., guardrails=False), `cosmos3 serve --no-guardrails`, or `--no-guardrails` on the CLI"
)


@runtime_checkable
class Guardrail(Protocol):
    def check_text(self, prompt: str) -> bool:
        """True when the prompt may be generated."""

    def check_video(self, frames: np.ndarray) -> np.ndarray | None:
        """uint8 `[T, H, W, 3]` -> the frames to return (e.g. with faces pixelated), or None to refuse them."""


class GuardrailUnavailable(RuntimeError):
    pass


class SafetyRefusal(RequestError):
    """A prompt or an output the guardrail refused (HTTP 400, CLI exit status 2)."""


class CosmosGuardrail:
    """The `cosmos_guardrail` package's `CosmosSafetyChecker` (text blocklist + model, video filter, face blur)."""

    def __init__(self, device: str = "cpu"):
        try:
            from cosmos_guardrail import CosmosSafetyChecker
        except ImportError as exc:
            raise GuardrailUnavailable(
                f"guardrails are on but the cosmos_guardrail package is missing: {INSTALL_HINT}"
            ) from exc
        try:
            self.checker = CosmosSafetyChecker()
        except Exception as exc:  # its models could not be loaded (no network, no cache)
            raise GuardrailUnavailable(
                f"guardrails are on but their models could not be loaded ({exc}): {INSTALL_HINT}"
            ) from exc
        self.device = device

    def check_text(self, prompt: str) -> bool:
        self.checker.to(self.device)
        try:
            return bool(self.checker.check_text_safety(prompt))
        finally:
            self.checker.to("cpu")

    def check_video(self, frames: np.ndarray) -> np.ndarray | None:
        self.checker.to(self.device)
        try:
            return self.checker.check_video_safety(frames)
        finally:
            self.checker.to("cpu")


def check_prompt(guardrail: Guardrail | None, prompt: str) -> None:
    if guardrail is not None and not guardrail.check_text(prompt):
        raise SafetyRefusal(
            "prompt",
            prompt,
            "a prompt the guardrail accepts (NVIDIA Open Model License)",
            "was refused by the guardrail",
        )


def check_output(guardrail: Guardrail | None, frames: np.ndarray) -> np.ndarray:
    if guardrail is None:
        return frames
    checked = guardrail.check_video(frames)
    if checked is None:
        raise SafetyRefusal(
            "output",
            "<generated video>",
            "content the guardrail accepts",
            "was refused by the guardrail after generation",
        )
    checked = np.asarray(checked)
    if checked.shape != frames.shape or checked.dtype != np.uint8:
        raise RuntimeError(
            f"the guardrail returned frames of {checked.shape} {checked.dtype}, expected {frames.shape} uint8"
        )
    return checked
