"""`model_mode: "reasoner"` entries (seed 003's Reasoner Framework input) in spec files, `cosmos3 batch` and the
hosted `/predict`, on the tiny model: the reply equals `engine.reason` for the same prompt, medium and settings, is
written with a sidecar, takes part in --resume; invalid entries and bodies fail naming their field."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_server import mp4_bytes, png_bytes

import cosmos3
import cosmos3.engine
from cosmos3.cli import main
from cosmos3.generation.dialects import FRAMEWORK_DEFAULTS
from cosmos3.reason_request import REASONER_OUTPUT, ReasonRequest
from cosmos3.server.app import Settings, create_app
from cosmos3.server.limits import Limits

# The Framework's reasoner defaults (dialects.py): greedy, repetition 1.0, presence 0.0. engine.reason's own defaults
# are the documents' chat settings, so the expected replies pass the Framework's explicitly.
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0}
SMALL = {"height": 64, "width": 96, "num_steps": 1}


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny", device="cpu")


def ask(prompt: str, url: str | None = None, kind: str = "image") -> list[dict]:
    parts = [{"type": f"{kind}_url", f"{kind}_url": {"url": url}}] if url else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_defaults_are_the_frameworks_greedy_decoding():
    req = ReasonRequest.from_dict({"model_mode": "reasoner", "prompt": "Describe.", "enable_sound": False}).resolved()
    row = FRAMEWORK_DEFAULTS["reasoner"]
    assert (req.do_sample, req.temperature, req.max_tokens) == (False, 0.0, row["max_tokens"]) == (False, 0.0, 1024)
    assert (req.repetition_penalty, req.presence_penalty, req.seed) == (1.0, 0.0, 0)
    sampled = ReasonRequest.from_dict({"model_mode": "reasoner", "prompt": "x", "do_sample": True}).resolved()
    assert sampled.temperature == 1.0  # the Framework's temperature when sampling
    assert ReasonRequest.from_dict({"prompt": "x", "top_p": 0.5}).resolved().do_sample  # a sampling field samples
    # the extension (or a data URI's type) says whether vision_path is an image or a video
    assert ReasonRequest.from_dict({"prompt": "x", "vision_path": "https://h/clip.MP4"}).video == "https://h/clip.MP4"
    assert ReasonRequest.from_dict({"prompt": "x", "vision_path": "https://h/robot_153.jpg"}).image is not None


def test_mixed_spec_writes_both_equal_to_engine_reason_and_resumes(engine, tmp_path, monkeypatch, capsys):
    (tmp_path / "robot.png").write_bytes(png_bytes(80, 60, seed=1))
    (tmp_path / "clip.mp4").write_bytes(mp4_bytes())
    spec = [
        {  # seed 003's example, a local image relative to the spec file
            "model_mode": "reasoner",
            "name": "robot_image",
            "prompt": "Describe what is happening in this image in one sentence.",
            "vision_path": "robot.png",
            "enable_sound": False,
            "max_new_tokens": 8,
        },
        {  # sampled, seeded, on a video
            "model_mode": "reasoner",
            "name": "clip",
            "prompt": "What happens?",
            "vision_path": "clip.mp4",
            "temperature": 0.9,
            "seed": 5,
            "max_tokens": 6,
            "video_fps": 4,
        },
        {"name": "cup", "model_mode": "text2image", "prompt": "a cup", "seed": 2, **SMALL},
    ]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    outs = tmp_path / "outs"
    run = ["generate", "--model", "tiny", "--device", "cpu", "--spec", str(spec_path), "--output-dir", str(outs)]
    assert main(run) == 0
    assert "3 entries: 3 written, 0 skipped (complete), 0 failed" in capsys.readouterr().out
    assert (outs / "cup" / "vision.jpg").is_file()

    # the same media as data URIs: the module's engine may serve an app that reads no local files
    image = ask(spec[0]["prompt"], data_uri((tmp_path / "robot.png").read_bytes(), "image/png"))
    assert (outs / "robot_image" / REASONER_OUTPUT).read_text() == engine.reason(image, max_tokens=8, seed=0, **GREEDY)
    video = ask("What happens?", data_uri((tmp_path / "clip.mp4").read_bytes(), "video/mp4"), "video")
    sampled = engine.reason(
        video, max_tokens=6, temperature=0.9, seed=5, repetition_penalty=1.0, presence_penalty=0.0, video_fps=4
    )
    assert sampled and (outs / "clip" / REASONER_OUTPUT).read_text() == sampled

    # the sidecar: the resolved request and its hash, the seed, model, version, timings
    sidecar = json.loads((outs / "robot_image" / f"{REASONER_OUTPUT}.json").read_text())
    assert sidecar["files"] == [REASONER_OUTPUT, f"{REASONER_OUTPUT}.json"]
    request = sidecar["request"]
    assert request["mode"] == "reasoner" and request["prompt"] == spec[0]["prompt"]
    assert request["image"] == str(tmp_path / "robot.png") and request["max_tokens"] == 8
    assert request["temperature"] == 0.0 and request["do_sample"] is False and sidecar["seed"] == 0
    restored = ReasonRequest(**{k: v for k, v in request.items() if k != "mode"}, checked=True)
    assert restored.key() == sidecar["request_sha256"]
    assert sidecar["inputs_sha256"]["image"] and sidecar["model"]["path"]
    assert sidecar["cosmos3_version"] and sidecar["timings"]["reason_s"] >= 0 and "save_s" in sidecar["timings"]
    assert json.loads((outs / "robot_image" / "sample_args.json").read_text()) == request
    assert json.loads((outs / "clip" / f"{REASONER_OUTPUT}.json").read_text())["seed"] == 5

    # --resume skips every complete entry, reasoner ones included, decoding nothing and rewriting nothing
    before = _mtimes(outs)

    def refuse(*a, **k):
        raise AssertionError("resume must not run a complete entry")

    monkeypatch.setattr(cosmos3.engine.Engine, "reason", refuse)
    monkeypatch.setattr(cosmos3.engine.Engine, "generate", refuse)
    assert main([*run, "--resume"]) == 0
    assert "3 entries: 0 written, 3 skipped (complete), 0 failed" in capsys.readouterr().out
    assert _mtimes(outs) == before
    # without --resume or --overwrite an existing reply is an error naming it
    assert main(run) == 1
    err = capsys.readouterr().err
    assert f"failed: robot_image: output='{REASONER_OUTPUT}' exists" in err
    assert _mtimes(outs) == before
    # a changed entry: its old reply belongs to another request
    spec[0]["max_new_tokens"] = 9
    spec_path.write_text(json.dumps(spec))
    assert main([*run, "--resume"]) == 1
    assert "failed: robot_image:" in capsys.readouterr().err and _mtimes(outs) == before
    monkeypatch.undo()
    assert main([*run, "--overwrite"]) == 0
    assert json.loads((outs / "robot_image" / "sample_args.json").read_text())["max_tokens"] == 9


def test_invalid_reasoner_entries_fail_alone_naming_the_field(tmp_path, capsys):
    spec = [
        {"model_mode": "reasoner", "name": "sound", "prompt": "x", "enable_sound": True},
        {"model_mode": "reasoner", "name": "steps", "prompt": "x", "num_steps": 3},
        {"model_mode": "reasoner", "name": "greedy", "prompt": "x", "do_sample": False, "temperature": 0.5},
        {"model_mode": "reasoner", "name": "empty", "vision_path": "missing.png"},
        {"model_mode": "reasoner", "name": "missing", "prompt": "x", "vision_path": "missing.png"},
        {"model_mode": "reasoner", "name": "ok", "prompt": "Hello", "max_tokens": 3},
        {"model_mode": "text2image", "name": "cup", "prompt": "a cup", **SMALL},
    ]
    (tmp_path / "spec.jsonl").write_text("".join(json.dumps(e) + "\n" for e in spec))
    run = ["generate", "--model", "tiny", "--spec", str(tmp_path / "spec.jsonl"), "--output-dir", str(tmp_path)]
    assert main([*run, "--num-steps", "1"]) == 1  # a Generator flag: the reasoner entries are not its
    captured = capsys.readouterr()
    assert "7 entries: 2 written, 0 skipped (complete), 5 failed" in captured.out
    assert "failed: sound: enable_sound=True" in captured.err
    assert "failed: steps: num_steps=3 is not a field of a reasoner entry" in captured.err
    assert "failed: greedy: temperature=0.5" in captured.err and "do_sample is false" in captured.err
    assert "failed: empty: prompt='' is missing" in captured.err
    assert "failed: missing: vision_path=" in captured.err
    assert (tmp_path / "ok" / REASONER_OUTPUT).is_file() and (tmp_path / "cup" / "vision.jpg").is_file()


def test_surfaces_decide_which_entries_can_run(tmp_path, monkeypatch, capsys):
    spec = [
        {"model_mode": "reasoner", "name": "r", "prompt": "Hello", "max_tokens": 3},
        {"model_mode": "text2image", "name": "g", "prompt": "a cup", **SMALL},
    ]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    loads = []
    real_load = cosmos3.engine.load

    def recording_load(model, **kwargs):
        loads.append(kwargs.get("surfaces"))
        return real_load(model, **kwargs)

    monkeypatch.setattr(cosmos3.engine, "load", recording_load)
    run = ["generate", "--model", "tiny", "--spec", str(tmp_path / "spec.json"), "--output-dir"]
    assert main([*run, str(tmp_path / "a"), "--surfaces", "reasoner"]) == 1
    err = capsys.readouterr().err
    assert "failed: g: model_mode='text2image' needs the generator surface" in err
    assert (tmp_path / "a" / "r" / REASONER_OUTPUT).is_file()
    assert main([*run, str(tmp_path / "b"), "--surfaces", "generator"]) == 1
    assert "failed: r: model_mode='reasoner' needs the reasoner surface" in capsys.readouterr().err
    assert (tmp_path / "b" / "g" / "vision.jpg").is_file()
    # a run of reasoner entries only loads the reasoner surface alone
    (tmp_path / "only.json").write_text(json.dumps(spec[:1]))
    run = ["generate", "--model", "tiny", "--spec", str(tmp_path / "only.json"), "--output-dir", str(tmp_path / "c")]
    assert main(run) == 0
    assert loads == [["reasoner"], ["generator"], ["reasoner"]]


@pytest.fixture()
def client(engine, tmp_path):
    settings = Settings(
        jobs_db=tmp_path / "jobs.db",
        outputs_dir=tmp_path / "outputs",
        limits=Limits(max_input_pixels=400 * 300),
    )
    with TestClient(create_app(engine, settings)) as c:
        yield c


def test_predict_reasoner_equals_engine_reason(engine, client):
    image = data_uri(png_bytes(80, 60, seed=2), "image/png")
    video = data_uri(mp4_bytes(), "video/mp4")
    greedy_image = engine.reason(ask("Describe the scene.", image), max_tokens=8, seed=0, **GREEDY)
    sampled_video = engine.reason(
        ask("What happens?", video, "video"), max_tokens=6, temperature=0.8, seed=7, presence_penalty=0.0
    )
    body = {"model_mode": "reasoner", "name": "robot_image", "prompt": "Describe the scene.", "vision_path": image}
    r = client.post("/predict", json={**body, "max_new_tokens": 8, "enable_sound": False})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["text"] == greedy_image
    assert (reply["model_mode"], reply["name"], reply["seed"]) == ("reasoner", "robot_image", 0)
    assert reply["sample_outputs"] == {
        "status": "success",
        "outputs": [{"content": {"reasoner_text": greedy_image}, "files": []}],
    }
    assert "data" not in reply and "format" not in reply
    # a video, sampled with a seed; the Reasoner tells it from the bytes, whatever the data URI's type says
    r = client.post(
        "/predict",
        json={
            "model_mode": "reasoner",
            "prompt": "What happens?",
            "vision_path": video.replace("video/mp4", "application/octet-stream", 1),
            "max_tokens": 6,
            "temperature": 0.8,
            "seed": 7,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == sampled_video and r.json()["seed"] == 7
    # text only
    r = client.post("/predict", json={"model_mode": "reasoner", "prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["text"] == engine.reason("Hello", max_tokens=4, seed=0, **GREEDY)


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({}, 400, "prompt", "is missing"),
        ({"prompt": "x", "vision_path": "data:image/png;base64,!!not base64!!"}, 400, "vision_path", "base64"),
        ({"prompt": "x", "vision_path": data_uri(png_bytes(800, 600), "image/png")}, 400, "vision_path", "too large"),
        ({"prompt": "x", "vision_path": data_uri(b"neither", "image/png")}, 400, "vision_path", "neither"),
        ({"prompt": "x", "vision_path": "/etc/passwd"}, 400, "vision_path", "local"),
        ({"prompt": "x", "enable_sound": True}, 400, "enable_sound", "text only"),
        ({"prompt": "x", "num_steps": 3}, 400, "num_steps", "not a field of a reasoner entry"),
        ({"prompt": "x", "do_sample": False, "top_k": 5}, 400, "top_k", "greedy"),
        ({"prompt": "x", "max_new_tokens": 100_000}, 400, "max_new_tokens", "at most 32768"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature", "from 0.0"),
        ({"prompt": "x", "video_fps": 0}, 400, "video_fps", "above 0"),
    ],
)
def test_predict_reasoner_bad_input_is_a_4xx_naming_the_field(client, body, status, param, words):
    r = client.post("/predict", json={"model_mode": "reasoner", **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["param"] == param and words in error["message"], error


def test_generator_modes_refuse_reasoner_fields(client):
    r = client.post("/predict", json={"model_mode": "text2image", "prompt": "x", "temperature": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_batch_runs_reasoner_entries_with_a_manifest_row(engine, tmp_path):
    ray = pytest.importorskip("ray")
    from cosmos3.batch import Entry, read_manifest, run

    (tmp_path / "robot.png").write_bytes(png_bytes(80, 60, seed=3))
    specs = {
        "r": {"model_mode": "reasoner", "prompt": "Describe.", "vision_path": str(tmp_path / "robot.png"), "seed": 1},
        "bad": {"model_mode": "reasoner", "prompt": "x", "enable_sound": True},
        "g": {"model_mode": "text2image", "prompt": "a cup", **SMALL},
    }
    specs["r"]["max_tokens"] = 6
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        entries = [Entry(name, spec) for name, spec in specs.items()]
        summary = run(entries, tmp_path / "out", "tiny", workers=1, options={"device": "cpu"}, progress=False)
        assert (summary.done, summary.failed) == (2, 1)
        again = run(
            [Entry(name, spec) for name, spec in specs.items()],
            tmp_path / "out",
            "tiny",
            options={"device": "cpu"},
            progress=False,
        )
        assert (again.done, again.skipped) == (0, 3)
    finally:
        if started:
            ray.shutdown()
    rows = read_manifest(tmp_path / "out")
    text_path = tmp_path / "out" / "r" / REASONER_OUTPUT
    assert rows["r"]["status"] == "done" and rows["r"]["seed"] == 1
    assert rows["r"]["outputs"] == [str(text_path), f"{text_path}.json"]
    image = data_uri((tmp_path / "robot.png").read_bytes(), "image/png")
    assert text_path.read_text() == engine.reason(ask("Describe.", image), max_tokens=6, seed=1, **GREEDY)
    assert rows["bad"]["status"] == "invalid" and "enable_sound=True" in rows["bad"]["error"]
    assert rows["g"]["status"] == "done"
