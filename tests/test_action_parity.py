"""Action modes and sound against diffusers' Cosmos3OmniPipeline on identical weights and seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

import cosmos3
from cosmos3.generation.request import EMBODIMENTS
from cosmos3.loading.tiny import write_pipeline

from test_generator_parity import gradient_image


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = write_pipeline(tmp_path_factory.mktemp("actions"), seed=9)
    pipe = Cosmos3OmniPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, cosmos3.load(folder)


CASES = {
    # name: (mode, domain, chunk, tier, input size (w, h), video frames or 0 for an image, guidance, view_point)
    "policy-bridge-image": ("policy", "bridge_orig_lerobot", 8, "256", (120, 90), 0, 1.0, "ego_view"),
    "policy-agibot-video-guided": ("policy", "agibotworld", 4, "256", (96, 96), 3, 3.0, "third_person_view"),
    "policy-pusht-downscale": ("policy", "pusht", 4, "256", (400, 260), 0, 1.0, None),
    "forward-droid": ("forward_dynamics", "droid_lerobot", 8, "256", (100, 80), 0, 1.0, "concat_view"),
    "forward-av-short-actions": ("forward_dynamics", "av", 8, "256", (90, 60), 2, 2.0, "wrist_view"),
    "inverse-hand": ("inverse_dynamics", "hand_pose", 8, "256", (64, 80), 9, 1.0, "ego_view"),
    "inverse-galbot-guided": ("inverse_dynamics", "galbot", 4, "256", (80, 64), 5, 4.0, "ego_view"),
    # Below the VAE's 4 frames a latent frame, the rollout has only its clean conditioning frame: the reference
    # returns that frame (a still) and, for policy, the chunk's actions.
    "policy-pusht-chunk-2": ("policy", "pusht", 2, "256", (96, 64), 0, 1.0, None),
    "forward-droid-chunk-1": ("forward_dynamics", "droid_lerobot", 1, "256", (96, 64), 0, 1.0, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_action_mode_matches_reference(pair, case):
    pipe, engine = pair
    mode, domain, chunk, tier, (w, h), n_video, guidance, view = CASES[case]
    width = EMBODIMENTS[domain][1]
    rng = np.random.default_rng(3)
    steps = chunk if case != "forward-av-short-actions" else 3
    actions = rng.normal(0, 0.5, (steps, width)).astype(np.float32) if mode == "forward_dynamics" else None
    image = gradient_image(w, h, 4) if n_video == 0 else None
    video = [gradient_image(w, h, s) for s in range(n_video)] if n_video else None
    ref = pipe(
        prompt="pick up the red cup",
        action=CosmosActionCondition(
            mode=mode,
            chunk_size=chunk,
            domain_name=domain,
            resolution_tier=int(tier),
            raw_actions=torch.from_numpy(actions) if actions is not None else None,
            image=image,
            video=video,
            view_point=view,
        ),
        fps=10.0,
        num_inference_steps=4,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(21),
        output_type="latent",
    )
    ours = engine.generate(
        mode=mode,
        prompt="pick up the red cup",
        domain_name=domain,
        action_chunk_size=chunk,
        resolution=tier,
        action=actions,
        image=image,
        video=video,
        view_point=view,
        fps=10.0,
        num_steps=4,
        guidance=guidance,
        seed=21,
        progress=False,
    )
    assert ours.latents.shape == ref.video.shape
    torch.testing.assert_close(ours.latents, ref.video, atol=1e-4, rtol=0)
    if mode == "forward_dynamics":
        assert ours.action is None and ref.action is None
    else:
        assert ours.action.shape == (chunk, width)
        assert np.abs(ref.action[0].numpy()).max() > 0.01
        np.testing.assert_allclose(ours.action, ref.action[0].numpy(), atol=1e-4, rtol=0)
    assert ours.metadata["action"]["action_space"] == "normalized"


def test_chained_rollout(pair, tmp_path):
    _, engine = pair
    fields = dict(
        mode="policy",
        prompt="push the block",
        domain_name="pusht",
        action_chunk_size=4,
        resolution="256",
        image=gradient_image(96, 64, 1),
        num_steps=2,
        guidance=1.0,
        seed=5,
        progress=False,
    )
    single = engine.generate(**fields)
    chained = engine.generate(**fields, chunks=3)
    assert chained.video.shape[0] == 1 + 3 * 4  # each chunk adds chunk_size frames after the shared one
    assert chained.action.shape == (12, 2)
    np.testing.assert_array_equal(chained.video[:5], single.video)
    np.testing.assert_array_equal(chained.action[:4], single.action)
    paths = chained.save(tmp_path / "rollout.mp4")
    assert [p.name for p in paths] == ["rollout.mp4", "rollout.json", "rollout.actions.png", "rollout.mp4.json"]


def test_action_stats_round_trip(pair, tmp_path):
    _, engine = pair
    stats = {"mean": [0.5, -1.0], "std": [2.0, 4.0]}
    fields = dict(
        mode="policy",
        prompt="push",
        domain_name="pusht",
        action_chunk_size=4,
        resolution="256",
        image=gradient_image(64, 64, 2),
        num_steps=2,
        guidance=1.0,
        seed=1,
        progress=False,
    )
    plain = engine.generate(**fields)
    scaled = engine.generate(**fields, action_stats=stats)
    np.testing.assert_allclose(scaled.action, plain.action * np.array([2.0, 4.0]) + np.array([0.5, -1.0]), rtol=1e-6)
    assert scaled.metadata["action"]["action_space"].startswith("raw")


def test_actions_far_outside_the_normalised_range_warn_naming_channels(pair, caplog):
    _, engine = pair
    fields = dict(
        mode="forward_dynamics",
        prompt="push",
        domain_name="pusht",
        action_chunk_size=4,
        resolution="256",
        image=gradient_image(64, 64, 3),
        num_steps=1,
        guidance=1.0,
        progress=False,
    )
    with caplog.at_level("WARNING", logger="cosmos3.generation.actions"):
        engine.generate(**fields, action=[[0.3, 40.0]] * 4)  # channel 1 is 40x the normalised scale
    assert "action channels [1]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cosmos3.generation.actions"):
        engine.generate(**fields, action=[[0.005, -0.004]] * 4)  # 55x too small, the reported user mistake
    assert "far too small" in caplog.text and "[0, 1]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cosmos3.generation.actions"):
        engine.generate(**fields, action=[[0.5, -0.8]] * 4)
    assert "action channels" not in caplog.text and "far too small" not in caplog.text
