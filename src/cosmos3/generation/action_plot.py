"""Action channels by name, and a plot of each channel over time (written beside an action result's JSON).

Channel names exist only where the layout is documented: the Cosmos 3 unified action representation (paper Fig. 3,
restated beside `_EMBODIMENT_TO_RAW_ACTION_DIM` in diffusers' `pipeline_cosmos3_omni.py`) builds every embodiment's
vector from a 9D pose (3D translation, then the 6D rotation of Zhou et al. 2019: two columns of the rotation
matrix), a 1D gripper state and a 15D fingertip block (3D x 5 fingers). The order of the two arms or hands is not
documented, so they are numbered (arm1, arm2), not called left and right. Domains whose layout is not documented
(pusht, galbot, libero) get ch0, ch1, ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pose(prefix: str = "") -> list[str]:
    return [f"{prefix}{c}" for c in ("x", "y", "z")] + [f"{prefix}rot6d_{i}" for i in range(6)]


def _arm(prefix: str) -> list[str]:
    return _pose(prefix) + [f"{prefix}gripper"]


_ONE_ARM = _arm("")
_TWO_ARMS = _arm("arm1_") + _arm("arm2_")

# domain_name -> channel names, for the documented layouts (see the module docstring).
ACTION_CHANNELS: dict[str, list[str]] = {
    "av": _pose(),  # a single ego pose
    "camera_pose": _pose(),
    "umi": _ONE_ARM,  # one arm: effector pose + gripper
    "bridge_orig_lerobot": _ONE_ARM,
    "droid_lerobot": _ONE_ARM,
    "robomind-franka": _ONE_ARM,
    "robomind-ur": _ONE_ARM,
    "fractal": _ONE_ARM,
    "robomind-franka-dual": _TWO_ARMS,  # two arms, each pose + gripper
    # humanoid: ego pose, then two arms (pose + gripper)
    "agibotworld": _pose("ego_") + _TWO_ARMS,
    "agibot_gear_gripper": _pose("ego_") + _TWO_ARMS,
    "agibot_gear_gripper_ext": _pose("ego_") + _TWO_ARMS,
    # two hands: ego pose, then per hand a wrist pose and 15 fingertip values
    "hand_pose": _pose("ego_")
    + [n for h in (1, 2) for n in _pose(f"hand{h}_wrist_") + [f"hand{h}_tip_{i}" for i in range(15)]],
}


def channel_names(domain_name: str | None, width: int) -> list[str]:
    """The documented names of a domain's `width` channels, else ch0, ch1, ..."""
    names = ACTION_CHANNELS.get(domain_name or "")
    if names is not None and len(names) == width:
        return list(names)
    return [f"ch{i}" for i in range(width)]


def chunk_boundaries(steps: int, chunks: int, chunk_size: int | None = None) -> list[int]:
    """Action steps where a chained rollout's chunks meet (chunk k starts at k * chunk_size)."""
    if chunks <= 1:
        return []
    size = chunk_size or steps // chunks
    return [k * size for k in range(1, chunks) if k * size < steps]


def action_figure(
    action: np.ndarray,
    names: list[str],
    boundaries: list[int],
    title: str,
    fps: float | None = None,
):
    """One small panel per channel, value over action steps; dashed lines where rollout chunks meet."""
    # The Agg canvas on a bare Figure: no pyplot, so the process's own backend and figures are left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, width = action.shape
    cols = min(width, 4 if width <= 16 else 6)
    rows = -(-width // cols)
    fig = Figure(figsize=(3.2 * cols, 1.9 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    x = np.arange(steps)
    for i, ax in enumerate(axes.flat):
        if i >= width:
            ax.set_visible(False)
            continue
        ax.plot(x, action[:, i], color="C0", linewidth=1.2, marker="." if steps <= 64 else None, markersize=3)
        for b in boundaries:
            ax.axvline(b - 0.5, color="C3", linestyle="--", linewidth=0.9)  # between the last and first steps
        ax.set_title(names[i], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for c in range(cols):  # the lowest drawn panel of each column carries the step axis
        ax = axes.flat[max(i for i in range(width) if i % cols == c)]
        ax.tick_params(labelbottom=True)
        ax.set_xlabel(f"step (1/{fps:g} s)" if fps else "step", fontsize=8)
    note = f"; dashed: chunk boundaries ({len(boundaries) + 1} chunks)" if boundaries else ""
    fig.suptitle(title + note, fontsize=10)
    return fig


def save_action_plot(
    path: str | Path,
    action: np.ndarray,
    domain_name: str | None,
    *,
    chunks: int = 1,
    chunk_size: int | None = None,
    fps: float | None = None,
    subtitle: str = "",
) -> Path:
    """Write the plot of `action` ([steps, channels]) as a PNG at `path`."""
    action = np.asarray(action, dtype=np.float32)
    names = channel_names(domain_name, action.shape[1])
    title = f"{domain_name or 'actions'}: {action.shape[0]} steps x {action.shape[1]} channels"
    fig = action_figure(
        action,
        names,
        chunk_boundaries(action.shape[0], chunks, chunk_size),
        title + (f" ({subtitle})" if subtitle else ""),
        fps,
    )
    fig.savefig(path, dpi=80, format="png")
    return Path(path)
