"""Action plots: channel names from the documented layouts, a panel per channel, chunk boundaries marked, and the
PNG written beside an action result's JSON."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cosmos3.cli import main
from cosmos3.generation.action_plot import (
    ACTION_CHANNELS,
    action_figure,
    channel_names,
    chunk_boundaries,
)
from cosmos3.generation.request import EMBODIMENTS


def test_channel_names_match_the_embodiment_widths():
    for domain, names in ACTION_CHANNELS.items():
        assert len(names) == EMBODIMENTS[domain][1], domain
        assert len(set(names)) == len(names), domain
    assert channel_names("droid_lerobot", 10) == ["x", "y", "z", *[f"rot6d_{i}" for i in range(6)], "gripper"]
    assert channel_names("agibotworld", 29)[9:11] == ["arm1_x", "arm1_y"]
    assert channel_names("pusht", 2) == ["ch0", "ch1"]  # layout not documented
    assert channel_names("droid_lerobot", 7) == [f"ch{i}" for i in range(7)]  # a width that does not fit the table


def test_chunk_boundaries():
    assert chunk_boundaries(48, 3, 16) == [16, 32]
    assert chunk_boundaries(12, 3) == [4, 8]
    assert chunk_boundaries(16, 1, 16) == []


def test_figure_has_a_panel_per_channel_and_the_boundaries():
    action = np.random.default_rng(0).normal(size=(12, 10)).astype(np.float32)
    fig = action_figure(action, channel_names("umi", 10), [4, 8], "umi")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == channel_names("umi", 10)
    for i, ax in enumerate(panels):
        curve, *verticals = ax.get_lines()
        np.testing.assert_array_equal(curve.get_ydata(), action[:, i])
        assert [line.get_xdata()[0] for line in verticals] == [3.5, 7.5]  # between the chunks' steps


def test_policy_rollout_saves_actions_plot_and_sidecar(tmp_path, capsys):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "first.png")
    out = tmp_path / "rollout.mp4"
    args = ["generate", "--model", "tiny", "--mode", "policy", "--domain-name", "droid_lerobot", "--prompt", "pick"]
    args += ["--image", str(tmp_path / "first.png"), "--action-chunk-size", "4", "--chunks", "2", "--num-steps", "1"]
    assert main([*args, "--output", str(out)]) == 0
    assert f"wrote {tmp_path / 'rollout.actions.png'}" in capsys.readouterr().out
    with Image.open(tmp_path / "rollout.actions.png") as plot:
        assert plot.format == "PNG" and plot.width > 400 and plot.height > 300
        pixels = np.asarray(plot.convert("RGB"))
    assert (pixels.std(axis=(0, 1)) > 10).all()  # drawn, not blank
    actions = json.loads((tmp_path / "rollout.json").read_text())
    assert np.asarray(actions["action"]).shape == (8, 10) and actions["domain_name"] == "droid_lerobot"
    sidecar = json.loads((tmp_path / "rollout.mp4.json").read_text())
    assert sidecar["files"] == ["rollout.mp4", "rollout.json", "rollout.actions.png", "rollout.mp4.json"]
    assert sidecar["result"]["chunks"] == 2 and sidecar["request"]["action_chunk_size"] == 4
