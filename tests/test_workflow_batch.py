"""Batch runs with `cosmos3 generate --spec`: spec formats, continue-on-error, resume, no silent overwrite,
sidecars and MP4 metadata tags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import cosmos3.engine
from cosmos3.cli import build_parser, jobs_from_args, main
from cosmos3.generation.request import GenerateRequest
from cosmos3.generation.result import SIDECAR_FORMAT, GenerationResult, request_json, request_key

SMALL = {"height": 64, "width": 96, "num_frames": 5, "num_steps": 1}

UPSAMPLED_VIDEO = {
    "subjects": [{"description": "a robot arm"}],
    "background_setting": "a lab",
    "lighting": {"key": "soft"},
    "temporal_caption": "the arm lifts a cup",
    "duration": "7s",
    "fps": 24.0,
    "resolution": {"H": 480, "W": 832},
    "aspect_ratio": "16,9",
}
UPSAMPLED_IMAGE = {
    "subjects": [{"description": "a cup"}],
    "comprehensive_t2i_caption": "A white cup on a table.",
    "lighting": {"key": "soft"},
    "resolution": {"H": 720, "W": 1280},
    "aspect_ratio": "16,9",
}


def _jobs(tmp_path: Path, spec_name: str, text: str, *flags: str):
    (tmp_path / spec_name).write_text(text)
    args = build_parser().parse_args(["generate", "--spec", str(tmp_path / spec_name), *flags])
    return jobs_from_args(args)


def test_spec_formats_json_object_list_jsonl_and_upsampler_output(tmp_path):
    entry = {"name": "one", "model_mode": "text2image", "prompt": "a cup"}
    (job,) = _jobs(tmp_path, "obj.json", json.dumps(entry))
    assert job.request.mode == "text2image" and job.output == Path("outputs/one/vision.jpg")

    jobs = _jobs(tmp_path, "list.json", json.dumps([entry, {"prompt": "waves"}]))
    assert [j.label for j in jobs] == ["one", "sample_1"]
    assert jobs[1].request.mode == "text2video" and jobs[1].request.dialect == "framework"

    # JSONL: a broken line fails alone; the entries around it are read
    jobs = _jobs(tmp_path, "lines.jsonl", json.dumps(entry) + "\n\nnot json\n" + json.dumps({"prompt": "b"}) + "\n")
    assert [j.status for j in jobs] == ["pending", "failed", "pending"]
    assert "line 3" in jobs[1].error and "not valid JSON" in jobs[1].error

    # the upsampler's JSON array: the structured prompt is the prompt; mode, canvas and fps come from it
    jobs = _jobs(tmp_path, "up.json", json.dumps([UPSAMPLED_VIDEO, UPSAMPLED_IMAGE]))
    video, image = (j.request for j in jobs)
    assert json.loads(video.prompt) == UPSAMPLED_VIDEO
    assert (video.mode, video.resolution, video.aspect_ratio, video.fps) == ("text2video", "480", "16,9", 24.0)
    assert (image.mode, image.resolution) == ("text2image", "720")
    # ... and its JSONL; flags override what the prompt says
    text = "".join(json.dumps(o) + "\n" for o in (UPSAMPLED_VIDEO, UPSAMPLED_IMAGE))
    jobs = _jobs(tmp_path, "up.jsonl", text, "--mode", "image2video", "--image", "first.jpg", "--num-frames", "9")
    assert [(j.request.mode, j.request.image, j.request.num_frames) for j in jobs] == [
        ("image2video", "first.jpg", 9)
    ] * 2
    (job,) = _jobs(
        tmp_path, "v.json", json.dumps({"model_mode": "image2video", "vision_path": "a.jpg"}), "--image", "b.jpg"
    )
    assert job.request.image == "b.jpg"  # a flag's path is the shell's, not made relative to the spec
    (job,) = _jobs(tmp_path, "v.json", json.dumps({"model_mode": "image2video", "vision_path": "a.jpg"}))
    assert job.request.image == str(tmp_path / "a.jpg")  # an entry's path is relative to its spec file


def test_broken_json_spec_and_conflicting_flags_exit_2(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('[{"prompt": "a"},')
    assert main(["generate", "--spec", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "ok.json").write_text("{}")
    assert main(["generate", "--spec", str(tmp_path / "ok.json"), "--output", "x.mp4"]) == 2
    assert main(["generate", "--prompt", "x", "--resume", "--overwrite"]) == 2


def test_request_key_follows_input_content_not_its_path(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(a)
    b.write_bytes(a.read_bytes())
    req = dict(mode="image2video", prompt="x", num_frames=5, resolution="256")
    key_a = request_key(GenerateRequest(**req, image=str(a)).resolved())
    assert key_a == request_key(GenerateRequest(**req, image=str(b)).resolved())
    Image.fromarray(np.full((32, 32, 3), 8, np.uint8)).save(b)
    assert key_a != request_key(GenerateRequest(**req, image=str(b)).resolved())
    assert key_a != request_key(GenerateRequest(**req, image=str(a), seed=1).resolved())


def test_existing_output_is_an_error_naming_it_before_the_model_loads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"precious")

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(cosmos3.engine, "load", no_load)
    assert main(["generate", "--prompt", "x", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_batch_goes_on_past_failures_resumes_and_never_overwrites(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.png").write_bytes(b"not an image")  # exists, so it fails only once the model reads it
    spec = [
        {"name": "vid", "model_mode": "text2video", "prompt": "a robot arm", "seed": 5, **SMALL},
        {"name": "bad", "model_mode": "text2video", "prompt": "x", "guidance": -1, **SMALL},
        {"name": "corrupt", "model_mode": "image2video", "prompt": "x", "vision_path": "broken.png", **SMALL},
        {"name": "img", "model_mode": "text2image", "prompt": "a cup", "seed": 2, "height": 64, "width": 96},
    ]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    outs = tmp_path / "outs"
    run = ["generate", "--model", "tiny", "--spec", str(spec_path), "--output-dir", str(outs), "--num-steps", "1"]

    assert main(run) == 1  # two entries failed, the run went on past them
    captured = capsys.readouterr()
    assert "4 entries: 2 written, 0 skipped (complete), 2 failed" in captured.out
    assert "failed: bad: guidance=-1" in captured.err
    assert "failed: corrupt: image=" in captured.err and "cannot be read" in captured.err

    # the sidecar: resolved request, its hash, the seed, model, version, timings
    sidecar = json.loads((outs / "vid" / "vision.mp4.json").read_text())
    assert sidecar["format"] == SIDECAR_FORMAT
    assert sidecar["files"] == ["vision.mp4", "vision.mp4.json"]
    assert sidecar["request"]["prompt"] == "a robot arm" and sidecar["request"]["num_steps"] == 1
    assert sidecar["request"]["height"] == 64 and sidecar["seed"] == 5
    restored = GenerateRequest(**{**sidecar["request"], "checked": True})
    assert request_key(restored) == sidecar["request_sha256"]
    assert sidecar["model"]["path"].endswith(tuple(f"tiny-v{i}" for i in range(1, 10)))
    assert sidecar["cosmos3_version"] and sidecar["timings"]["generate_s"] > 0 and "save_s" in sidecar["timings"]
    assert sidecar["result"]["num_frames"] == 5 and sidecar["result"]["computed_steps"] == 1
    assert json.loads((outs / "img" / "vision.jpg.json").read_text())["seed"] == 2
    # the MP4 carries the prompt and seed as metadata tags
    with av.open(str(outs / "vid" / "vision.mp4")) as container:
        tags = dict(container.metadata)
    assert tags["prompt"] == "a robot arm" and tags["seed"] == "5" and tags["mode"] == "text2video"
    assert json.loads((outs / "vid" / "sample_args.json").read_text()) == sidecar["request"]

    # --resume: the complete entries are skipped without a generation; nothing is rewritten
    before = _mtimes(outs)

    def no_generate(*a, **k):
        raise AssertionError("resume must not generate a complete entry")

    monkeypatch.setattr(cosmos3.engine.Engine, "generate", no_generate)
    assert main([*run, "--resume"]) == 1  # the two invalid entries still fail
    assert "4 entries: 0 written, 2 skipped (complete), 2 failed" in capsys.readouterr().out
    assert _mtimes(outs) == before

    # without --resume or --overwrite, an existing output is an error naming its path (and nothing is touched)
    assert main(run) == 1
    err = capsys.readouterr().err
    assert f"failed: vid: output='vision.mp4' exists: {outs / 'vid' / 'vision.mp4'};" in err
    assert _mtimes(outs) == before

    # --resume with a changed entry: its old output belongs to another request, so it is an error, not a rewrite
    spec[0]["seed"] = 6
    spec_path.write_text(json.dumps(spec))
    assert main([*run, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "failed: vid:" in err and "different request" in err and "vision.mp4" in err
    assert _mtimes(outs) == before
    monkeypatch.undo()

    # --overwrite replaces it, and its sidecar says so
    assert main([*run, "--overwrite"]) == 1
    assert "2 written" in capsys.readouterr().out
    assert json.loads((outs / "vid" / "vision.mp4.json").read_text())["seed"] == 6
    assert os.stat(outs / "vid" / "vision.mp4").st_mtime_ns > before["vid/vision.mp4"]


def test_python_save_writes_the_sidecar_with_what_it_knows(tmp_path):
    engine = cosmos3.engine.load("tiny")
    req = engine.request(mode="text2image", prompt="a cup", height=64, width=96, num_steps=1, seed=3)
    result = engine.generate(req, progress=False)
    assert result.save(tmp_path / "a.png")[-1] == tmp_path / "a.png.json"
    recorded = json.loads((tmp_path / "a.png.json").read_text())  # the engine recorded what made it
    assert recorded["request"] == request_json(req) and recorded["seed"] == 3
    assert recorded["timings"]["generate_s"] > 0
    bare = GenerationResult(video=result.video, fps=result.fps, latents=result.latents, metadata={"seed": 3})
    bare.save(tmp_path / "bare.png")
    assert json.loads((tmp_path / "bare.png.json").read_text())["request"] is None  # nobody recorded it: it says so
    result.record_origin(req, engine.path, 1.25)
    result.save(tmp_path / "b.png")
    full = json.loads((tmp_path / "b.png.json").read_text())
    assert full["request"] == request_json(req) and full["timings"]["generate_s"] == 1.25
    with pytest.raises(ValueError, match="output"):
        result.save(tmp_path / "c.gif")


def _jobs_bytes(tmp_path: Path, spec_name: str, data: bytes):
    (tmp_path / spec_name).write_bytes(data)
    return jobs_from_args(build_parser().parse_args(["generate", "--spec", str(tmp_path / spec_name)]))


def test_unreadable_spec_files_exit_2_naming_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cosmos3.engine, "load", lambda *a, **k: pytest.fail("the model must not load"))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"prompt": "a"}\n\xff\xfe\x00{bad')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for path, why in ((binary, "line 2 is not UTF-8 text (byte 0xff"), (deep, "nested too deeply")):
        assert main(["generate", "--spec", str(path)]) == 2  # was 1, with only the exception's class and text
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: spec=") and str(path) in err and why in err and "allowed:" in err, err
        assert "Traceback" not in err

    # JSON Lines: each bad line fails alone, named by the file and its line
    jobs = _jobs_bytes(tmp_path, "lines.jsonl", b'{"prompt": "a"}\n\xff\n' + b"[" * 100_000 + b"\n")
    spec = str(tmp_path / "lines.jsonl")
    assert [j.status for j in jobs] == ["pending", "failed", "failed"]
    assert spec in jobs[1].error and "line 2 is not UTF-8 text (byte 0xff" in jobs[1].error
    assert spec in jobs[2].error and "line 3 is JSON nested too deeply" in jobs[2].error


@pytest.mark.parametrize("name", ["../../escape", "/tmp/cosmos3-abs-escape", "sub/../../escape", ".."])
def test_spec_names_cannot_write_outside_the_output_dir(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setattr(cosmos3.engine, "load", lambda *a, **k: pytest.fail("the model must not load"))
    spec = tmp_path / "spec.json"
    image = {"name": name, "model_mode": "text2image", "prompt": "x", **SMALL, "num_frames": 1}
    spec.write_text(json.dumps([image, {"name": name, "model_mode": "reasoner", "prompt": "x"}]))
    outs = tmp_path / "a" / "b" / "outs"
    assert main(["generate", "--model", "tiny", "--spec", str(spec), "--output-dir", str(outs)]) == 1
    err = capsys.readouterr().err
    for i in (0, 1):  # a reasoner entry's reasoner_text.txt too
        assert f"failed: sample_{i}: name={name!r} is not allowed; allowed: a plain folder name" in err
    assert not list(tmp_path.rglob("vision.*")) and not list(tmp_path.rglob("reasoner_text.txt"))
    assert not (tmp_path / "escape").exists() and not Path("/tmp/cosmos3-abs-escape").exists()
