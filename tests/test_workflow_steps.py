"""Step counts up to the validated 1000: the UniPC start-index fix, and a clear error where float32 sigmas
coincide."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

import cosmos3
from cosmos3.errors import RequestError
from cosmos3.generation.sampler import make_scheduler
from cosmos3.loading.tiny import tiny_path


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((tiny_path() / "scheduler" / "scheduler_config.json").read_text())


def _run(scheduler, steps: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, generator=gen)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.randn(1, 4, generator=gen), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("steps", [120, 200, 1000])
def test_many_steps_run_to_the_end(config, steps, native):
    scheduler = make_scheduler(config, steps, None, native, "cpu")
    # the cause: at shift 10 the first two integer timesteps coincide, which sent diffusers' lookup to index 1
    assert scheduler.timesteps[0] == scheduler.timesteps[1]
    plain = UniPCMultistepScheduler.from_config(config)
    plain.set_timesteps(steps)
    with pytest.raises(AssertionError):  # what users saw
        _run(plain, steps)
    assert torch.isfinite(_run(scheduler, steps)).all()


@pytest.mark.parametrize("steps", [1, 2, 35, 99])
def test_the_fix_changes_nothing_where_diffusers_worked(config, steps):
    plain = UniPCMultistepScheduler.from_config(config)
    plain.set_timesteps(steps)
    torch.testing.assert_close(_run(make_scheduler(config, steps, None, False, "cpu"), steps), _run(plain, steps))


def test_coinciding_sigmas_are_a_request_error(config):
    with pytest.raises(RequestError, match="num_steps=1000 .*shift=1000"):
        make_scheduler(config, 1000, 1000.0, False, "cpu")
    make_scheduler(config, 1000, 100.0, False, "cpu")  # the same count at a smaller shift is fine


def test_generate_past_the_old_limit(config):
    # At shift 50 the old limit (num_train_timesteps / shift) is 20 steps: 30 shows the fix at a small cost.
    assert make_scheduler(config, 30, 50.0, False, "cpu").timesteps[:2].tolist() == [999, 999]
    engine = cosmos3.load("tiny")
    fields = dict(mode="text2video", prompt="waves", height=32, width=48, num_frames=5, guidance=1.0)
    result = engine.generate(**fields, num_steps=30, shift=50.0, progress=False)
    assert result.metadata["computed_steps"] == 30 and np.isfinite(result.latents.numpy()).all()
    with pytest.raises(RequestError, match="num_steps"):
        engine.generate(**fields, num_steps=1000, shift=1000.0, progress=False)
