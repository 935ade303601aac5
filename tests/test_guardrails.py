"""Guardrails through the public interface: a fake checker refuses prompts and pixelates a face region."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

import cosmos3
from cosmos3.guardrails import GuardrailUnavailable, SafetyRefusal
from cosmos3.loading.tiny import write_pipeline
from cosmos3.server.app import Settings, create_app

FAKE_CHECKER = '''
import numpy as np


class FakeChecker:
    """Refuses prompts that mention "forbidden"; pixelates the top-left 16x16 "face" in 8x8 blocks."""

    calls = []

    def check_text(self, prompt):
        FakeChecker.calls.append(prompt)
        return "forbidden" not in prompt

    def check_video(self, frames):
        out = frames.copy()
        face = out[:, :16, :16].astype(np.float32)
        blocks = face.reshape(face.shape[0], 2, 8, 2, 8, 3).mean(axis=(2, 4), keepdims=True)
        out[:, :16, :16] = np.broadcast_to(blocks, (face.shape[0], 2, 8, 2, 8, 3)).reshape(face.shape).round()
        return out
'''


@pytest.fixture(scope="module")
def checker_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checker")
    (folder / "fake_checker.py").write_text(FAKE_CHECKER)
    sys.path.insert(0, str(folder))
    import fake_checker

    yield folder, fake_checker
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("tiny"), seed=6)


def generate_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cosmos3.cli", "generate", *args], capture_output=True, text=True, env=env
    )


FIELDS = dict(mode="text2video", num_frames=5, height=32, width=48, num_steps=2, progress=False)


def is_pixelated(frames: np.ndarray) -> bool:
    face = frames[:, :16, :16].astype(int)
    return all((face[:, r : r + 8, c : c + 8] == face[:, r : r + 1, c : c + 1]).all() for r in (0, 8) for c in (0, 8))


def test_python_refuses_unsafe_prompt_and_pixelates(folder, checker_module):
    _, fake = checker_module
    engine = cosmos3.load(folder, guardrails=fake.FakeChecker())
    with pytest.raises(SafetyRefusal) as err:
        engine.generate(prompt="a forbidden scene", **FIELDS)
    assert err.value.field == "prompt" and "refused by the guardrail" in str(err.value)
    result = engine.generate(prompt="a person waves", **FIELDS)
    assert is_pixelated(result.video) and result.metadata["guardrails"] is True
    plain = engine.generate(prompt="a person waves", enable_safety_check=False, **FIELDS)  # per request
    assert not is_pixelated(plain.video) and plain.metadata["guardrails"] is False
    assert engine.generate(prompt="a forbidden scene", enable_safety_check=False, **FIELDS).video.shape[0] == 5


def test_refused_output_is_an_error(folder):
    class RefuseAll:
        def check_text(self, prompt):
            return True

        def check_video(self, frames):
            return None

    engine = cosmos3.load(folder, guardrails=RefuseAll())
    with pytest.raises(SafetyRefusal, match="refused by the guardrail after generation"):
        engine.generate(prompt="x", **FIELDS)


def test_missing_package_fails_at_load_with_instructions(folder, tmp_path):
    with pytest.raises(GuardrailUnavailable, match="pip install cosmos_guardrail.*guardrails=False"):
        cosmos3.load(folder, guardrails=True)
    # A checkpoint that enables its safety checker (as released ones do) gets it by default.
    enabled = write_pipeline(tmp_path / "enabled")
    index = json.loads((enabled / "model_index.json").read_text())
    (enabled / "model_index.json").write_text(json.dumps({**index, "enable_safety_checker": True}))
    with pytest.raises(GuardrailUnavailable):
        cosmos3.load(enabled)
    assert cosmos3.load(enabled, guardrails=False).generator.guardrail is None
    args = [
        "--model",
        str(enabled),
        "--prompt",
        "x",
        "--num-frames",
        "5",
        "--height",
        "32",
        "--width",
        "32",
        "--num-steps",
        "1",
        "--output",
        str(tmp_path / "o.mp4"),
    ]
    proc = generate_cli(*args)
    assert proc.returncode == 1 and "pip install cosmos_guardrail" in proc.stderr
    proc = generate_cli(*args, "--no-guardrails")
    assert proc.returncode == 0, proc.stderr


def test_cli_custom_checker_refuses(folder, checker_module, tmp_path):
    path, _ = checker_module
    proc = generate_cli(
        "--model",
        str(folder),
        "--prompt",
        "a forbidden scene",
        "--guardrail",
        "fake_checker:FakeChecker",
        "--num-frames",
        "5",
        "--height",
        "32",
        "--width",
        "48",
        "--num-steps",
        "1",
        "--output",
        str(tmp_path / "o.mp4"),
        env={**os.environ, "PYTHONPATH": str(path)},
    )
    assert proc.returncode == 2 and "error: prompt=" in proc.stderr and "refused" in proc.stderr


def test_http_400_and_switches(folder, checker_module, tmp_path):
    _, fake = checker_module
    settings = Settings(jobs_db=tmp_path / "jobs.db", outputs_dir=tmp_path / "out", max_pixels=64 * 64)
    form = {"size": "48x32", "num_frames": "5", "num_inference_steps": "1"}
    with TestClient(create_app(cosmos3.load(folder, guardrails=fake.FakeChecker()), settings)) as client:
        r = client.post("/v1/videos/sync", data={"prompt": "a forbidden scene", **form})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = client.post(
            "/v1/videos/sync",
            data={"prompt": "a forbidden scene", **form, "extra_params": json.dumps({"guardrails": False})},
        )
        assert r.status_code == 200
        r = client.post(
            "/predict",
            json={
                "model_mode": "text2video",
                "prompt": "forbidden",
                "num_frames": 5,
                "resolution": "256",
                "num_steps": 1,
            },
        )
        assert r.status_code == 400
    # Server-wide off (`cosmos3 serve --no-guardrails`): nothing is checked, and asking for checks is an error.
    settings.jobs_db = tmp_path / "jobs2.db"
    with TestClient(create_app(cosmos3.load(folder, guardrails=False), settings)) as client:
        assert client.post("/v1/videos/sync", data={"prompt": "a forbidden scene", **form}).status_code == 200
        r = client.post(
            "/v1/videos/sync", data={"prompt": "x", **form, "extra_params": json.dumps({"guardrails": True})}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "extra_params.guardrails"
