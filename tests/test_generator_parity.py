"""Every vision mode end to end against diffusers' Cosmos3OmniPipeline on the same folder, seed and settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler
from PIL import Image

import cosmos3
from cosmos3.config import preset
from cosmos3.generation.request import RESOLUTIONS
from cosmos3.loading.tiny import write_pipeline

PIPELINES = {
    "tiny": preset("tiny"),
    "relu2-p1": preset("tiny").__class__(
        **{
            **preset("tiny").__dict__,
            "hidden_act": "relu2",
            "qk_norm_for_text": False,
            "use_und_k_norm_for_gen": True,
            "latent_patch_size": 1,
            "latent_channel": 12,
            "rms_norm_eps": 1e-5,
        }
    ),
}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pair(request, tmp_path_factory):
    folder = write_pipeline(tmp_path_factory.mktemp(request.param), PIPELINES[request.param], seed=5)
    pipe = Cosmos3OmniPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, cosmos3.load(folder)


def gradient_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))


def run_both(pipe, engine, **fields):
    """Run the reference (latents and frames) and cosmos3 with the same fields."""
    req = engine.request(**fields)
    scheduler = pipe.scheduler
    if req.shift is not None:  # how the documents set a shift on the reference
        pipe.scheduler = UniPCMultistepScheduler.from_config(
            scheduler.config, flow_shift=req.shift, use_karras_sigmas=False
        )
    ref_kwargs = dict(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        num_frames=req.num_frames,
        height=req.height,
        width=req.width,
        fps=req.fps,
        num_inference_steps=req.num_steps,
        guidance_scale=req.guidance,
        generator=torch.Generator().manual_seed(req.seed),
        enable_sound=req.enable_sound,
        use_system_prompt=req.use_system_prompt,
        add_resolution_template=req.use_resolution_template,
        add_duration_template=req.use_duration_template,
    )
    if req.mode == "image2video":
        ref_kwargs["image"] = req.image
    if req.mode == "video2video":
        ref_kwargs.update(
            video=req.video,
            condition_frame_indexes_vision=req.condition_frame_indexes_vision,
            condition_video_keep=req.condition_video_keep,
        )
    try:
        ref_latent = pipe(**ref_kwargs, output_type="latent")
        ref_kwargs["generator"] = torch.Generator().manual_seed(req.seed)
        ref_np = pipe(**ref_kwargs, output_type="np")
    finally:
        pipe.scheduler = scheduler
    return ref_latent, ref_np, engine.generate(req, progress=False)


def assert_same(ref_latent, ref_np, ours):
    assert ours.latents.shape == ref_latent.video.shape
    assert ref_latent.video.abs().max() > 0.1
    torch.testing.assert_close(ours.latents, ref_latent.video, atol=1e-4, rtol=0)
    ref_frames = np.round(ref_np.video * 255)
    assert ours.video.shape == ref_frames.shape
    assert np.abs(ours.video.astype(np.float64) - ref_frames).max() <= 1
    if ref_latent.sound is not None:
        torch.testing.assert_close(torch.from_numpy(ours.sound), ref_latent.sound.float(), atol=1e-4, rtol=0)


CASES = {
    "t2i-guided": dict(mode="text2image", height=64, width=80, guidance=4.0),
    "t2i-unguided-no-system": dict(mode="text2image", height=48, width=48, guidance=1.0, use_system_prompt=False),
    "t2v-odd-latent": dict(mode="text2video", num_frames=9, height=48, width=80, guidance=6.0),
    "t2v-no-templates": dict(
        mode="text2video",
        num_frames=5,
        height=64,
        width=64,
        guidance=2.5,
        use_resolution_template=False,
        use_duration_template=False,
        fps=16,
    ),
    "t2v-guidance-below-1": dict(mode="text2video", num_frames=5, height=32, width=48, guidance=0.5),
    "t2v-sound": dict(mode="text2video", num_frames=9, height=32, width=48, guidance=3.0, enable_sound=True, fps=30),
    "t2v-json-prompt-shift": dict(
        mode="text2video",
        num_frames=5,
        height=32,
        width=64,
        shift=5.0,
        prompt='{"subjects": [{"description": "a robot"}], "fps": 24}',
    ),
    "t2v-tier-256-3x4": dict(mode="text2video", num_frames=5, resolution="256", aspect_ratio="3,4", num_steps=2),
    "i2v": dict(mode="image2video", num_frames=9, height=48, width=64, image=gradient_image(90, 40, 1)),
    "i2v-torch-float-unit": dict(
        mode="image2video",
        num_frames=5,
        height=48,
        width=48,
        image=torch.rand(3, 40, 70, generator=torch.Generator().manual_seed(3)),
    ),
    "i2v-numpy-float-signed": dict(
        mode="image2video",
        num_frames=5,
        height=32,
        width=64,
        image=np.random.default_rng(4).uniform(-1, 1, (50, 30, 3)).astype(np.float32),
    ),
    "i2v-portrait-sound": dict(
        mode="image2video", num_frames=5, height=64, width=32, enable_sound=True, image=gradient_image(50, 70, 2)
    ),
    "v2v-first": dict(
        mode="video2video", num_frames=13, height=32, width=48, video=[gradient_image(60, 40, s) for s in range(7)]
    ),
    "v2v-last-index-2": dict(
        mode="video2video",
        num_frames=13,
        height=32,
        width=48,
        condition_frame_indexes_vision=[0, 2],
        condition_video_keep="last",
        video=[gradient_image(50, 30, s) for s in range(12)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mode_matches_reference(pair, case):
    pipe, engine = pair
    fields = {
        "prompt": "A robot arm picks up a cup.",
        "negative_prompt": "blurry",
        "num_steps": 4,
        "seed": 11,
        **CASES[case],
    }
    assert_same(*run_both(pipe, engine, **fields))


def test_diffusers_and_vllm_field_names_are_accepted(pair):
    _, engine = pair
    req = engine.request(
        mode="text2video",
        prompt="x",
        add_resolution_template=False,
        add_duration_template=False,
        generate_sound=True,
        num_inference_steps=3,
        guidance_scale=2.0,
        flow_shift=4.0,
    )
    assert (req.use_resolution_template, req.use_duration_template, req.enable_sound) == (False, False, True)
    assert (req.num_steps, req.guidance, req.shift) == (3, 2.0, 4.0)


def test_tiers_map_to_documented_sizes():
    engine_defaults = {"resolution": "480", "aspect_ratio": "16,9"}
    req = cosmos3.GenerateRequest(mode="text2video", prompt="x").resolved(engine_defaults)
    assert (req.width, req.height) == (832, 480)
    for tier, table in RESOLUTIONS.items():
        for aspect, (w, h) in table.items():
            r = cosmos3.GenerateRequest(mode="text2image", prompt="x", resolution=tier, aspect_ratio=aspect).resolved()
            assert (r.width, r.height) == (w, h)
            assert w % 16 == 0 and h % 16 == 0


def test_native_flow_schedule_and_karras_config_follow_the_checkpoint(tmp_path):
    """Pipeline/scheduler settings read from the folder: `use_native_flow_schedule` and a Karras-sigma scheduler."""
    folder = write_pipeline(tmp_path / "p", seed=8)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "use_native_flow_schedule": True}))
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "use_karras_sigmas": True}))
    pipe = Cosmos3OmniPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.use_native_flow_schedule
    engine = cosmos3.load(folder)
    fields = {
        "mode": "text2video",
        "prompt": "waves",
        "num_frames": 5,
        "height": 32,
        "width": 48,
        "num_steps": 4,
        "guidance": 3.0,
        "seed": 2,
    }
    assert_same(*run_both(pipe, engine, **fields))


def test_batched_requests_equal_separate_runs(pair):
    _, engine = pair
    base = dict(mode="text2video", num_frames=5, height=32, width=48, num_steps=3, fps=16)
    requests = [
        dict(base, prompt="a red cup", seed=1, guidance=6.0),
        dict(base, prompt="waves on a beach at dusk", seed=2, guidance=1.0, negative_prompt="blur"),
        dict(base, prompt="a robot", seed=3, guidance=3.5, use_system_prompt=False),
    ]
    batched = engine.generate_batch(requests)
    for fields, result in zip(requests, batched, strict=True):
        single = engine.generate(**fields, progress=False)
        torch.testing.assert_close(result.latents, single.latents, atol=1e-5, rtol=0)
        assert np.abs(result.video.astype(int) - single.video.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="one shape"):
        engine.generate_batch([requests[0], dict(requests[1], height=48)])
