"""One request path: the same Framework spec through `cosmos3 generate --spec`, the Python API and `/predict`
resolves to requests that differ only where the dialect table says their defaults differ."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

import cosmos3
from cosmos3.cli import build_parser, jobs_from_args
from cosmos3.generation.dialects import differences
from cosmos3.generation.request import GenerateRequest
from cosmos3.server.app import Settings, create_app

from test_generator_parity import gradient_image

SPECS = [
    {"model_mode": "text2image", "prompt": "a red cup on a table", "seed": 3},
    {"model_mode": "text2video", "prompt": "a robot arm", "num_frames": 5, "resolution": "256"},
    {
        "model_mode": "policy",
        "prompt": "push",
        "domain_name": "pusht",
        "action_chunk_size": 4,
        "vision_path": "first.png",
    },
]


@pytest.fixture(scope="module")
def engine():
    return cosmos3.load("tiny", device="cpu")


def resolved_fields(req: GenerateRequest) -> dict:
    return {k: v for k, v in dataclasses.asdict(req).items() if k not in ("dialect", "checked", "image", "video")}


@pytest.mark.parametrize("spec", SPECS, ids=[s["model_mode"] for s in SPECS])
def test_framework_spec_through_every_front_end(engine, spec, tmp_path):
    gradient_image(96, 80, 1).save(tmp_path / "first.png")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = build_parser().parse_args(["generate", "--spec", str(tmp_path / "spec.json"), "--output-dir", "out"])
    cli = engine.request(jobs_from_args(args)[0].request)

    python = engine.request({**spec, "vision_path": str(tmp_path / "first.png")} if "vision_path" in spec else spec)

    settings = Settings(
        jobs_db=tmp_path / "jobs.db",
        outputs_dir=tmp_path / "outputs",
        allowed_local_media_path=tmp_path,
    )
    with TestClient(create_app(engine, settings)) as client:
        body = {**spec, "num_steps": 1}
        if "vision_path" in spec:
            body["vision_path"] = str(tmp_path / "first.png")
        reply = client.post("/predict", json=body)
        assert reply.status_code == 200, reply.text
        (job,) = client.app.state.store.list()
        hosted = GenerateRequest(**job.request)

    # /predict speaks the hosted dialect, which has the Framework's defaults: the same request but the steps sent.
    assert (cli.dialect, python.dialect, hosted.dialect) == ("framework", "python", "hosted")
    assert {**resolved_fields(hosted), "num_steps": cli.num_steps} == resolved_fields(cli)

    # The Python API differs from the spec file exactly where the two dialects' defaults differ, for fields the
    # spec left unset and the tiny engine's own defaults (resolution, frames, steps) do not settle.
    mode = cli.mode
    given = {"model_mode", "prompt", "vision_path", *spec} | set(engine.defaults)
    expected = {f for f in differences("framework", "python", mode) if f not in given}
    if {"resolution", "aspect_ratio"} & expected:  # the tier and aspect give the size
        expected |= {"width", "height"}
    differing = {k for k, v in resolved_fields(cli).items() if resolved_fields(python)[k] != v}
    assert differing == expected
    assert expected, "the spec should leave some dialect default unset"
