"""A checkpoint whose VAE is 8x (Wan2.1-style) instead of 16x: sizes, frame counts, action canvases and crops follow
the VAE's own factors, as the reference reads them from the VAE config."""

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
    folder = write_pipeline(tmp_path_factory.mktemp("vae8"), seed=4, vae_spatial=8)
    pipe = Cosmos3OmniPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    engine = cosmos3.load(folder)
    assert (engine.generator.parts.video.spatial, engine.generator.parts.video.temporal) == (8, 4)
    return pipe, engine


ACTION_CASES = {
    # name: (mode, domain, chunk, input size (w, h), video frames or 0 for an image)
    # 300x200 is not aligned to the canvas: the reference crops it to multiples of 8 (300 -> 296), not of 16.
    "policy-image-300x200": ("policy", "pusht", 4, (300, 200), 0),
    "forward-image-300x200": ("forward_dynamics", "bridge_orig_lerobot", 4, (300, 200), 0),
    "inverse-video-100x76": ("inverse_dynamics", "pusht", 4, (100, 76), 5),
}


@pytest.mark.parametrize("case", sorted(ACTION_CASES))
def test_action_modes_with_8x_vae_match_reference(pair, case):
    pipe, engine = pair
    mode, domain, chunk, (w, h), n_video = ACTION_CASES[case]
    width = EMBODIMENTS[domain][1]
    actions = np.random.default_rng(5).normal(0, 0.5, (chunk, width)).astype(np.float32)
    actions = actions if mode == "forward_dynamics" else None
    image = gradient_image(w, h, 2) if n_video == 0 else None
    video = [gradient_image(w, h, s) for s in range(n_video)] if n_video else None
    ref = pipe(
        prompt="push the block",
        action=CosmosActionCondition(
            mode=mode,
            chunk_size=chunk,
            domain_name=domain,
            resolution_tier=256,
            raw_actions=torch.from_numpy(actions) if actions is not None else None,
            image=image,
            video=video,
        ),
        fps=10.0,
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(8),
        output_type="latent",
    )
    ours = engine.generate(
        mode=mode,
        prompt="push the block",
        domain_name=domain,
        action_chunk_size=chunk,
        resolution="256",
        action=actions,
        image=image,
        video=video,
        fps=10.0,
        num_steps=3,
        guidance=2.0,
        seed=8,
        progress=False,
    )
    assert ours.latents.shape == ref.video.shape
    torch.testing.assert_close(ours.latents, ref.video, atol=1e-4, rtol=0)
    if mode != "forward_dynamics":
        np.testing.assert_allclose(ours.action, ref.action[0].numpy(), atol=1e-4, rtol=0)


def test_video2video_with_8x_vae_matches_reference(pair):
    pipe, engine = pair
    frames = [gradient_image(136, 72, s) for s in range(9)]
    ref = pipe(
        prompt="a lab",
        video=frames,
        num_frames=9,
        height=72,
        width=136,
        condition_frame_indexes_vision=[0, 1],
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    )
    ours = engine.generate(
        mode="video2video",
        prompt="a lab",
        video=frames,
        num_frames=9,
        height=72,
        width=136,
        num_steps=2,
        guidance=3.0,
        seed=2,
        progress=False,
    )
    torch.testing.assert_close(ours.latents, ref.video, atol=1e-4, rtol=0)


def test_sizes_follow_the_vae_factor(pair):
    _, engine = pair
    assert engine.request(prompt="x", height=72, width=136).width == 136  # 8x: allowed, 16x would refuse it
    with pytest.raises(cosmos3.RequestError, match="multiple of 8"):
        engine.request(prompt="x", height=72, width=140)
