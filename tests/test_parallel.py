"""Parallel layouts on CPU processes (gloo): every layout gives the single-process latents (1e-5) and the Reasoner's
greedy tokens under tensor parallelism are the single-process ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cosmos3
from cosmos3.errors import RequestError
from cosmos3.parallel.layout import Layout

from test_generator_parity import gradient_image

# 80x112 -> 5x7 latent cells per frame (patch 1), 3 latent frames: 105 generation tokens, which 2 divides unevenly
# and 4 too, so Ulysses pads; sound and action tokens ride along in their modes.
SIZE = dict(height=80, width=112)
REQUESTS = {
    "text2video": dict(mode="text2video", num_frames=9, **SIZE),
    "image2video": dict(mode="image2video", num_frames=9, image=gradient_image(150, 100, 1), **SIZE),
    "text2video+sound": dict(mode="text2video", num_frames=9, enable_sound=True, **SIZE),
    "policy": dict(mode="policy", domain_name="pusht", action_chunk_size=4, image=gradient_image(96, 96, 2)),
}
COMMON = dict(prompt="a robot arm", num_steps=2, guidance=3.0, seed=5, progress=False)
LAYOUTS = {  # (cfg, ulysses, tp, layerwise offload)
    "cfg2": (2, 1, 1, False),
    "ulysses2": (1, 2, 1, False),
    "ulysses4-padded": (1, 4, 1, False),
    "tp2": (1, 1, 2, False),
    "tp2-cfg2": (2, 1, 2, False),
    "ulysses2-cfg2": (2, 2, 1, False),
    "tp2-offload": (1, 1, 2, True),  # seed 001's Super example: TP with layerwise offload
}
CHAT = [{"role": "user", "content": "Describe a kitchen."}]


@pytest.fixture(scope="module")
def single():
    engine = cosmos3.load("tiny", device="cpu")
    latents = {name: engine.generate(**COMMON, **fields).latents for name, fields in REQUESTS.items()}
    tokens = engine.reason(CHAT, max_tokens=12, temperature=0.0)
    return latents, tokens


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(single, layout):
    latents, tokens = single
    cfg, ulysses, tp, offload = LAYOUTS[layout]
    layout_args = dict(cfg_parallel_size=cfg, ulysses_degree=ulysses, tensor_parallel_size=tp)
    with cosmos3.load("tiny", device="cpu", layerwise_offload=offload, **layout_args) as e:
        assert e.groups.layout.world_size == cfg * ulysses * tp and e.groups.leader
        for name, fields in REQUESTS.items():
            ours = e.generate(**COMMON, **fields).latents
            torch.testing.assert_close(ours, latents[name], atol=1e-5, rtol=0, msg=f"{layout} {name}")
        if tp > 1:
            assert e.reason(CHAT, max_tokens=12, temperature=0.0) == tokens


def test_layout_errors_name_the_flag():
    with pytest.raises(RequestError, match="cfg_parallel_size"):
        Layout(cfg_parallel_size=3)
    with pytest.raises(RequestError, match="ulysses_degree"):
        cosmos3.load("tiny", device="cpu", ulysses_degree=3)  # 3 does not divide the tiny model's 4 heads


def test_offloaded_layers_give_the_same_outputs(single):
    latents, tokens = single
    engine = cosmos3.load("tiny", device="cpu", layerwise_offload=True)
    assert type(engine.transformer.layers).__name__ == "OffloadedLayers"
    for name, fields in REQUESTS.items():
        np.testing.assert_array_equal(engine.generate(**COMMON, **fields).latents.numpy(), latents[name].numpy())
    assert engine.reason(CHAT, max_tokens=12, temperature=0.0) == tokens
