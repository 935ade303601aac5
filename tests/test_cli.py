"""The command line: the README's main job, spec files, errors, and what the written files contain."""

from __future__ import annotations

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cosmos3.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosmos3.cli", *args], capture_output=True, text=True, timeout=300)


def test_readme_main_job_writes_playable_mp4(tmp_path):
    out = tmp_path / "out.mp4"
    proc = run_cli(
        "generate",
        "--model",
        "tiny",
        "--mode",
        "text2video",
        "--prompt",
        "A robot arm picks up a cup.",
        "--output",
        str(out),
        "--num-frames",
        "13",
        "--fps",
        "16",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == 16
    assert len(frames) == 13
    assert frames[0].shape == (192, 320, 3)  # the tiny model's default tier is 256p, 16:9 -> 320x192


def test_sound_is_muxed_as_aac_with_the_video_duration(tmp_path):
    out = tmp_path / "sound.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--mode",
                "text2video",
                "--prompt",
                "rain on a roof",
                "--enable-sound",
                "--num-frames",
                "17",
                "--fps",
                "16",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert audio.rate == 48000 and audio.channels == 2
        samples = sum(f.samples for f in container.decode(audio))
    # AAC adds encoder priming; the track covers the video's 17/16 s, not the codec's whole last hop.
    assert abs(samples / 48000 - 17 / 16) < 0.05


def test_text2image_writes_jpg(tmp_path):
    out = tmp_path / "img.jpg"
    assert main(["generate", "--model", "tiny", "--mode", "text2image", "--prompt", "a cup", "--output", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (320, 192)


def test_spec_file_list_with_relative_vision_path(tmp_path):
    Image.fromarray(np.full((50, 80, 3), 120, np.uint8)).save(tmp_path / "first.png")
    spec = [
        {
            "name": "a",
            "model_mode": "image2video",
            "prompt": "a robot",
            "vision_path": "first.png",
            "num_frames": 5,
            "resolution": "256",
            "aspect_ratio": "16,9",
            "num_steps": 2,
            "guidance": 6.0,
            "shift": 10.0,
            "seed": 3,
        },
        {"name": "b", "model_mode": "text2image", "prompt": "a cup", "num_steps": 2},
    ]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_cli(
        "generate", "--model", "tiny", "--spec", str(tmp_path / "spec.json"), "--output-dir", str(tmp_path / "outs")
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "outs" / "a" / "vision.mp4").is_file()
    assert (tmp_path / "outs" / "b" / "vision.jpg").is_file()
    args = json.loads((tmp_path / "outs" / "a" / "sample_args.json").read_text())
    assert args["mode"] == "image2video" and args["seed"] == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mode", "text2video", "--fps", "12"], "fps=12.0"),
        (["--mode", "text2video", "--num-frames", "400"], "num_frames=400"),
        (["--mode", "text2video", "--height", "100", "--width", "160"], "height=100"),
        (["--mode", "text2video", "--height", "40", "--width", "64"], "height=40"),  # 8k but not 16k: the VAE's
        (["--mode", "image2video"], "image=None"),
        (["--mode", "text2video", "--resolution", "1080"], "resolution='1080'"),
        (["--mode", "policy", "--domain-name", "libero", "--image", "{png}"], "domain_name='libero'"),
        (
            ["--mode", "policy", "--domain-name", "droid_lerobot", "--image", "{png}", "--raw-action-dim", "7"],
            "raw_action_dim=7",
        ),
        (["--mode", "forward_dynamics", "--domain-name", "av", "--image", "{png}"], "action=None"),
        (["--mode", "inverse_dynamics", "--domain-name", "av", "--image", "{png}"], "video=None"),
        (["--mode", "image2video", "--image", "/does/not/exist.png"], "image='/does/not/exist.png'"),
    ],
)
def test_invalid_values_exit_2_with_one_line(tmp_path, args, needle):
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    args = [a.format(png=png) for a in args]
    proc = run_cli("generate", "--model", "tiny", "--prompt", "x", "--output", str(tmp_path / "o.mp4"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "allowed" in lines[0]


def test_corrupt_media_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    proc = run_cli(
        "generate",
        "--model",
        "tiny",
        "--mode",
        "image2video",
        "--prompt",
        "x",
        "--image",
        str(bad),
        "--output",
        str(tmp_path / "o.mp4"),
    )
    assert proc.returncode == 2
    assert "cannot be read" in proc.stderr and "image=" in proc.stderr


def test_reason_with_image_and_stream(tmp_path):
    img = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(img)
    proc = run_cli(
        "reason", "--model", "tiny", "--image", str(img), "--prompt", "Describe the scene.", "--max-tokens", "6"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    proc = run_cli("reason", "--model", "tiny", "--prompt", "Hello", "--stream", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("reason", "--model", "tiny", "--image", str(tmp_path / "missing.png"), "--prompt", "x")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


class _Stop(Exception):
    """Raised by the stand-in loader once it has recorded its arguments."""


def _recording_load(calls: list):
    def load(model, **kwargs):
        calls.append({"model": model, **kwargs})
        raise _Stop()

    return load


SWITCHES = ["--fp8", "--compile", "--fast", "--vae-tiling", "--surfaces", "generator,reasoner", "--revision", "v2"]
SWITCHED = {
    "fp8": True,
    "compile": True,
    "fast": True,
    "vae_tiling": True,
    "surfaces": ["generator", "reasoner"],
    "revision": "v2",
}


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "x", "--output", "never.mp4"],
        ["reason", "--prompt", "x"],
        ["serve", "--port", "1"],
    ],
)
def test_model_switches_reach_the_engine(monkeypatch, tmp_path, command):
    import cosmos3.engine

    monkeypatch.chdir(tmp_path)
    calls: list = []
    monkeypatch.setattr(cosmos3.engine, "load", _recording_load(calls))
    assert main([*command, "--model", "some/model", *SWITCHES, "--ulysses-degree", "2"]) == 1  # _Stop, reported
    (call,) = calls
    assert call["model"] == "some/model" and call["ulysses_degree"] == 2 and call["tensor_parallel_size"] == 1
    for name, value in SWITCHED.items():
        assert call[name] == value, name
    calls.clear()
    assert main([*command, "--model", "some/model"]) == 1
    assert {k: calls[0][k] for k in SWITCHED} == {
        "fp8": False,
        "compile": "auto",
        "fast": False,
        "vae_tiling": False,
        "surfaces": ["reasoner"] if command[0] == "reason" else None,  # reason loads only the Reasoner by default
        "revision": None,
    }


def test_step_cache_reaches_the_request(monkeypatch, tmp_path):
    import cosmos3.engine
    from cosmos3.generation.result import GenerationResult

    seen = []

    class Engine:  # the two calls cmd_generate makes, recorded
        path = tmp_path

        def request(self, req):
            return req.resolved({}, (16, 4))

        def generate(self, req):  # like the Engine, it records what made the result
            seen.append(req)
            result = GenerationResult(video=np.zeros((1, 16, 16, 3), np.uint8), fps=24.0, latents=torch.zeros(1))
            return result.record_origin(req, self.path)

    monkeypatch.setattr(cosmos3.engine, "load", lambda model, **kwargs: Engine())
    out = tmp_path / "a.jpg"
    args = ["generate", "--mode", "text2image", "--prompt", "x", "--step-cache", "0.05", "--output", str(out)]
    assert main(args) == 0
    assert seen[0].step_cache == 0.05 and json.loads(out.with_name("a.jpg.json").read_text())["request"]["step_cache"]


def test_unreadable_text_inputs_exit_2_naming_the_flag(tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"a cup\n\xff\xfe\n")
    deep = tmp_path / "schema.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    upsample = ["upsample", "--output", str(tmp_path / "o.json"), "--mode", "text2video", "--endpoint-url", "x"]
    assert main([*upsample, "--model", "m", "--input", str(binary)]) == 2
    assert "input=" in capsys.readouterr().err
    assert main(["reason", "--model", "tiny", "--prompt", "x", "--json-schema", str(deep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: json_schema=") and "RecursionError" in err and "allowed:" in err
