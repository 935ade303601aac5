"""Pixel-space conditioning: the reference's exact resizes for images, videos and action canvases.

Every function returns float32 `[1, 3, T, H, W]` in [-1, 1] (the VAE's input range).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cosmos3 import media
from cosmos3.generation.request import ACTION_TIERS

# Action canvases per tier as (H, W), from the reference's action resolution bins (diffusers'
# `_ACTION_RESOLUTION_BINS`, keyed there by H / W): inputs are downscaled (never upscaled) and padded into the entry
# nearest in aspect. The order matters: the first entry wins a tie.
ACTION_CANVASES: dict[str, list[tuple[int, int]]] = {
    "256": [(256, 256), (256, 320), (320, 256), (192, 320), (320, 192)],
    "480": [(640, 640), (544, 736), (736, 544), (480, 832), (832, 480)],
    "704": [(960, 960), (832, 1088), (1088, 832), (704, 1280), (1280, 704)],
    "720": [(960, 960), (832, 1104), (1104, 832), (720, 1280), (1280, 720)],
}
assert set(ACTION_CANVASES) == set(ACTION_TIERS)


def pil_to_unit(frames: list[Image.Image]) -> torch.Tensor:
    """PIL frames -> `[1, 3, T, H, W]` float32 in [-1, 1]."""
    arr = np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in frames])  # [T, H, W, 3]
    return (torch.from_numpy(arr).permute(3, 0, 1, 2)[None] * 2.0 - 1.0).contiguous()


def image_cover_crop(image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image-to-video conditioning: cover-resize (bilinear, antialiased, in 0..255) then centre-crop -> [1,3,H,W]."""
    x = media.image_values(image, "image")[None]
    src_h, src_w = x.shape[-2:]
    scale = max(width / src_w, height / src_h)
    new_h, new_w = math.ceil(scale * src_h), math.ceil(scale * src_w)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((new_h - height) / 2), round((new_w - width) / 2)
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255) / 127.5 - 1.0


def image_to_video_pixels(image: Image.Image | torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The conditioning image repeated over every frame (only latent frame 0 is kept clean)."""
    frame = image_cover_crop(image, height, width)
    return frame[:, :, None].expand(-1, -1, num_frames, -1, -1).contiguous()


def video_to_video_pixels(
    frames: list[Image.Image],
    num_frames: int,
    height: int,
    width: int,
    clean_latent_frames: list[int],
    keep: str,
    temporal: int,
) -> torch.Tensor:
    """Video-to-video: the first (or last) `temporal * max(index) + 1` frames (what the clean latent frames cover)
    stretched to size, tail repeat-filled."""
    needed = max(clean_latent_frames) * temporal + 1
    frames = frames[:needed] if keep == "first" else frames[-needed:]
    x = pil_to_unit([f.resize((width, height), resample=Image.BILINEAR) for f in frames])
    used = min(x.shape[2], num_frames)
    out = torch.empty(1, 3, num_frames, height, width)
    out[:, :, :used] = x[:, :, :used]
    out[:, :, used:] = x[:, :, used - 1 : used]
    return out


def action_canvas(
    frames: list[Image.Image], tier: str, num_frames: int, spatial: int
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Action conditioning clip on the tier's canvas; returns (pixels, (canvas_h, canvas_w), (content_h, content_w)).

    Frames are first cropped to multiples of the VAE's spatial factor by a bilinear stretch, as the reference's video
    processor does,
    the canvas is the tier entry nearest in aspect, then the clip is downscaled (bicubic, antialiased) to fit and
    padded right/bottom (reflect, or replicate when the pad exceeds the content).
    """
    w0, h0 = frames[0].size
    h, w = h0 - h0 % spatial, w0 - w0 % spatial
    x = pil_to_unit([f.resize((w, h), resample=Image.BILINEAR) for f in frames])
    canvas_h, canvas_w = canvas_size(h, w, tier)
    if x.shape[2] < num_frames:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, num_frames - x.shape[2], -1, -1)], dim=2)
    x = x[:, :, :num_frames]
    scale = min(canvas_w / w, canvas_h / h, 1.0)
    content_h, content_w = max(1, int(scale * h + 0.5)), max(1, int(scale * w + 0.5))
    x = x[0].permute(1, 0, 2, 3)  # [T, 3, h, w]
    if (content_h, content_w) != (h, w):
        x = F.interpolate(x, size=(content_h, content_w), mode="bicubic", align_corners=False, antialias=True)
    pad_w, pad_h = canvas_w - content_w, canvas_h - content_h
    if pad_w or pad_h:
        mode = "replicate" if pad_w >= content_w or pad_h >= content_h else "reflect"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x.permute(1, 0, 2, 3)[None].contiguous(), (canvas_h, canvas_w), (content_h, content_w)


def canvas_size(height: int, width: int, tier: str) -> tuple[int, int]:
    """The (H, W) canvas of `tier` whose aspect H/W is nearest to the input's (first entry wins ties)."""
    ratio = height / width
    return min(ACTION_CANVASES[tier], key=lambda hw: abs(hw[0] / hw[1] - ratio))
