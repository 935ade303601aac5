"""image2video and video2video encode only the pixel frames their clean latent frames depend on.

The reference encodes the whole clip (image2video: the image repeated over every frame) and keeps only the clean
latent frames. The Wan VAE encoder is causal in time, so the clean latents of a shorter clip are the same numbers;
at 720p x 189 frames the skipped encode is seconds (tests/test_generator_parity.py checks the whole request
against diffusers' pipeline).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cosmos3
from cosmos3.generation import conditioning


@pytest.fixture(scope="module")
def codec():
    engine = cosmos3.load("tiny", device="cpu", dtype="float32", guardrails=False)
    return engine.generator.parts.video


def frames(count: int, height: int = 48, width: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(count)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def test_image2video_first_frame_alone_gives_the_whole_clips_first_latent(codec):
    image = frames(1)[0]
    whole = codec.encode(conditioning.image_to_video_pixels(image, 17, 48, 64))
    first = codec.encode(conditioning.image_to_video_pixels(image, 1, 48, 64))
    assert first.shape[2] == 1
    torch.testing.assert_close(first[:, :, 0], whole[:, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clean", [[0, 1], [0, 2], [3]])
def test_video2video_covered_frames_give_the_whole_clips_clean_latents(codec, clean):
    video, n = frames(11), 21  # shorter than the request: the tail is repeat-filled
    temporal = codec.temporal
    whole = codec.encode(conditioning.video_to_video_pixels(video, n, 48, 64, clean, "first", temporal))
    covered = max(clean) * temporal + 1
    part = codec.encode(conditioning.video_to_video_pixels(video, covered, 48, 64, clean, "first", temporal))
    assert part.shape[2] == max(clean) + 1
    torch.testing.assert_close(part[:, :, clean], whole[:, :, clean], rtol=1e-5, atol=1e-6)


def test_image2video_request_encodes_one_frame(monkeypatch):
    engine = cosmos3.load("tiny", device="cpu", guardrails=False)
    video = engine.generator.parts.video
    seen = []
    encode = video.encode
    monkeypatch.setattr(video, "encode", lambda pixels: seen.append(pixels.shape[2]) or encode(pixels))
    engine.generate(mode="image2video", prompt="a cup", image=np.asarray(frames(1)[0]), num_frames=17, num_steps=2)
    engine.generate(
        mode="video2video",
        prompt="a cup",
        video=[np.asarray(f) for f in frames(9)],
        num_frames=17,
        num_steps=2,
        condition_frame_indexes_vision=[0, 1],
    )
    assert seen == [1, 5]
