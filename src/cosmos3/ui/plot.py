"""An action plot drawn with PIL alone: one panel per channel over time, dashed lines at chunk boundaries.

The playground shows the PNG a result folder already holds; this draws one when it holds none."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
PANEL_W, PANEL_H, LABEL_W, PAD = 360, 64, 64, 6


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def plot_actions(
    actions: Sequence[Sequence[float]] | np.ndarray,
    chunk_size: int | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
) -> Image.Image:
    """`actions` [steps, channels] -> an RGB image: a panel per channel (its name, or `ch i`, and its range),
    the values over the steps, zero as a grey line, and a dashed line after every `chunk_size` steps."""
    data = np.asarray(actions, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    steps, channels = data.shape if data.size else (0, 0)
    cols = 1 if channels <= 10 else 2 if channels <= 30 else 3
    rows = max(1, math.ceil(channels / cols))
    top = 28
    width = cols * (LABEL_W + PANEL_W + PAD) + PAD
    height = top + rows * (PANEL_H + PAD) + PAD
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, big = _font(11), _font(14)
    heading = title or f"{steps} steps x {channels} channels" + (f", chunks of {chunk_size}" if chunk_size else "")
    draw.text((PAD, 6), heading, fill="black", font=big)
    if steps == 0:
        return image
    for c in range(channels):
        col, row = divmod(c, rows)
        x0 = PAD + col * (LABEL_W + PANEL_W + PAD) + LABEL_W
        y0 = top + row * (PANEL_H + PAD)
        x1, y1 = x0 + PANEL_W, y0 + PANEL_H
        values = data[:, c]
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 1.0, hi + 1.0
        margin = 0.08 * (hi - lo)
        lo, hi = lo - margin, hi + margin
        draw.rectangle((x0, y0, x1, y1), outline="#bbbbbb", fill="#fafafa")
        name = names[c] if names is not None and c < len(names) else f"ch {c}"
        draw.text((x0 - LABEL_W + 2, y0 + 2), str(name)[:10], fill="black", font=small)
        draw.text((x0 - LABEL_W + 2, y0 + PANEL_H - 28), f"{hi - margin:+.2f}", fill="#555555", font=small)
        draw.text((x0 - LABEL_W + 2, y0 + PANEL_H - 14), f"{lo + margin:+.2f}", fill="#555555", font=small)

        def px(i: float, v: float, x0=x0, y1=y1, lo=lo, hi=hi) -> tuple[float, float]:
            x = x0 + 2 + (PANEL_W - 4) * (i / max(1, steps - 1))
            return x, y1 - 2 - (PANEL_H - 4) * (v - lo) / (hi - lo)

        if lo < 0 < hi:
            draw.line((px(0, 0.0), px(steps - 1, 0.0)), fill="#cccccc")
        if chunk_size:
            for boundary in range(chunk_size, steps, chunk_size):
                x, _ = px(boundary - 0.5, 0.0)
                for y in range(y0 + 1, y1, 6):
                    draw.line((x, y, x, min(y + 3, y1 - 1)), fill="#888888")
        points = [px(i, float(v)) for i, v in enumerate(values) if math.isfinite(v)]
        color = PALETTE[c % len(PALETTE)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points if steps <= 64 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
    return image
