"""Packing one sample into the joint sequence: text, then vision, sound and action tokens, with 3D mRoPE ids.

Layout: `[text (understanding, causal)] [vision frames] [sound frames] [action steps]`. Everything after the
text is the generation pathway. Text positions are 0..L-1 on all three rows; the generated modalities are
"temporal siblings" that all start at L + margin, with fps-scaled temporal ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cosmos3.config import TransformerConfig


@dataclass
class Packed:
    """Everything about a sample's sequence that does not change across denoising steps."""

    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [3, N]
    vision_grid: tuple[int, int, int]  # latent (T, h, w)
    vision_tokens_per_frame: int
    vision_noisy_frames: torch.Tensor  # latent frame indexes that are denoised
    sound_len: int = 0
    action_len: int = 0
    action_noisy_frames: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    action_domain: int = 0

    @property
    def und_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        t = self.vision_grid[0]
        return self.und_len + t * self.vision_tokens_per_frame + self.sound_len + self.action_len


def grid_position_ids(
    grid: tuple[int, int, int],
    offset: float,
    fps: float | None,
    base_fps: float,
    compression: int,
    base_compression: int | None = None,
    start_frame: int = 0,
) -> torch.Tensor:
    """`[3, T*h*w]` ids for a (T, h, w) grid starting at temporal `offset`, spatial ids reset to 0.

    With fps modulation (fps given and T > 1) frame i sits at `(i + start_frame) / (fps/compression) *
    (base_fps/base_compression) + offset` in fp32, evaluated in that order to match the reference's rounding.
    """
    t, h, w = grid
    if fps is not None and t > 1:
        tps = fps / compression
        base_tps = base_fps / (base_compression or compression)
        frame_t = (torch.arange(t, dtype=torch.float32) + start_frame) / tps * base_tps + offset
    else:
        frame_t = (torch.arange(t) + int(offset) + start_frame).float()
    tt = frame_t.view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()])


def pack(
    cfg: TransformerConfig,
    input_ids: list[int],
    vision_shape: tuple[int, int, int],
    vision_clean_frames: list[int],
    fps: float,
    vae_temporal_compression: int,
    sound_len: int = 0,
    action_len: int = 0,
    action_clean_frames: list[int] | None = None,
    action_domain: int = 0,
    device: torch.device | str = "cpu",
) -> Packed:
    """Build the static sequence for one prompt and one set of latent shapes."""
    if not cfg.unified_3d_mrope_reset_spatial_ids:
        raise ValueError("unified_3d_mrope_reset_spatial_ids=False is not supported by any released checkpoint")
    und_len = len(input_ids)
    t, h, w = vision_shape
    p = cfg.latent_patch_size
    grid = (t, math.ceil(h / p), math.ceil(w / p))
    base = und_len + cfg.unified_3d_mrope_temporal_modality_margin
    mod_fps = fps if cfg.enable_fps_modulation else None

    text_ids = torch.arange(und_len, dtype=torch.float32).expand(3, und_len)
    segments = [text_ids, grid_position_ids(grid, base, mod_fps, cfg.base_fps, vae_temporal_compression)]
    if sound_len:
        sound_fps = cfg.sound_latent_fps if cfg.enable_fps_modulation else None
        segments.append(grid_position_ids((sound_len, 1, 1), base, sound_fps, cfg.base_fps, 1))
    if action_len:
        # Action step i sits between latent frames: (i + 1) steps of one pixel frame each.
        segments.append(
            grid_position_ids(
                (action_len, 1, 1),
                base,
                mod_fps,
                cfg.base_fps,
                1,
                base_compression=vae_temporal_compression,
                start_frame=1,
            )
        )
    clean = set(vision_clean_frames)
    action_clean = set(action_clean_frames or [])
    return Packed(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        position_ids=torch.cat(segments, dim=1).to(device),
        vision_grid=(t, h, w),
        vision_tokens_per_frame=grid[1] * grid[2],
        vision_noisy_frames=torch.tensor([i for i in range(t) if i not in clean], dtype=torch.long, device=device),
        sound_len=sound_len,
        action_len=action_len,
        action_noisy_frames=torch.tensor(
            [i for i in range(action_len) if i not in action_clean], dtype=torch.long, device=device
        ),
        action_domain=action_domain,
    )
