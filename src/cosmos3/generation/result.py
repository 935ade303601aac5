"""What a generation returns: frames, sound, actions and metadata, and how they are written to files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosmos3 import media
from cosmos3.errors import RequestError


@dataclass
class GenerationResult:
    video: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    latents: torch.Tensor  # final normalised vision latents [1, C, T, h, w], fp32
    sound: np.ndarray | None = None  # float32 [channels, samples]
    sample_rate: int | None = None
    action: np.ndarray | None = None  # float32 [steps, raw_action_dim]
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> list[Path]:
        """Write `.jpg`/`.png` (one frame) or `.mp4` (AAC muxed when there is sound); actions go to a `.json`
        beside it. Returns the paths written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix in (".jpg", ".jpeg", ".png"):
            if self.video.shape[0] != 1:
                raise RequestError("output", str(path), "a .mp4 path for a video", "is an image path")
            media.write_image(path, self.video[0])
        elif suffix == ".mp4":
            media.write_video(path, self.video, self.fps, self.sound, self.sample_rate)
        else:
            raise RequestError("output", str(path), ".mp4, .jpg, .jpeg or .png", "has an unsupported extension")
        written = [path]
        if self.action is not None:
            action_path = path.with_suffix(".json")
            action_path.write_text(json.dumps({"action": self.action.tolist(), **self.metadata.get("action", {})}))
            written.append(action_path)
        return written
