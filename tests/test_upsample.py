"""Prompt upsampling against a local fake OpenAI-compatible server, and with the tiny model's own Reasoner."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request

VALID = {
    "subjects": [{"description": "a red robot arm", "location": "center"}],
    "background_setting": "a bright lab",
    "lighting": {"conditions": "soft daylight"},
    "temporal_caption": "The arm lifts a cup.",
    "actions": [{"time": "0:00-0:04", "description": "the arm lifts the cup"}],
}


def fake_app() -> FastAPI:
    app = FastAPI()
    app.state.calls = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.calls.append(body)
        model = body["model"]
        attempt = sum(1 for c in app.state.calls if c["messages"] == body["messages"])
        if model == "valid" or (model == "flaky" and attempt > 1):
            content = "```json\n" + json.dumps(VALID) + "\n```"
        elif model == "long":
            content = json.dumps({**VALID, "background_setting": "a very detailed lab " * 60})
        elif model == "flaky":
            content = "Sure! Here is a prompt: {not json"
        else:
            content = json.dumps({"caption": "wrong keys"})
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }

    return app


@pytest.fixture(scope="module")
def endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = fake_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", app
    server.should_exit = True
    thread.join(10)


def upsample(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "prompts.txt").write_text("a robot arm lifts a cup\n\n   \na dog runs on a beach\n")
    return subprocess.run(
        [sys.executable, "-m", "cosmos3.cli", "upsample", "--input", str(tmp_path / "prompts.txt"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_valid_replies_become_structured_prompts(endpoint, tmp_path):
    url, app = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "valid",
        "--resolution",
        "480",
        "--aspect-ratio",
        "16,9",
    )
    assert proc.returncode == 0, proc.stderr
    prompts = json.loads((tmp_path / "out.json").read_text())
    assert len(prompts) == 2  # blank lines are skipped
    assert prompts[0]["resolution"] == {"H": 480, "W": 832} and prompts[0]["aspect_ratio"] == "16,9"
    assert prompts[0]["duration"] == "7s" and prompts[0]["fps"] == 24.0
    assert prompts[0]["subjects"] == VALID["subjects"]
    body = app.state.calls[-1]  # the documents' sampling defaults reach the endpoint
    assert (body["temperature"], body["top_p"], body["top_k"], body["presence_penalty"], body["seed"]) == (
        0.7,
        0.8,
        20,
        1.5,
        3407,
    )


def test_invalid_then_valid_is_retried_and_jsonl(endpoint, tmp_path):
    url, _ = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.jsonl"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "flaky",
    )
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["subjects"] for line in lines)


def test_always_invalid_is_a_clear_error(endpoint, tmp_path):
    url, _ = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "broken",
    )
    assert proc.returncode == 2
    assert "no valid JSON in 3 attempts" in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_image2video_needs_an_image_and_sends_it(endpoint, tmp_path):
    url, app = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "image2video",
        "--endpoint-url",
        url,
        "--model",
        "valid",
    )
    assert proc.returncode == 2 and "image_url" in proc.stderr
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "first.png")
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "image2video",
        "--endpoint-url",
        url,
        "--model",
        "valid",
        "--image-url",
        str(tmp_path / "first.png"),
    )
    assert proc.returncode == 0, proc.stderr
    part = app.state.calls[-1]["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")


def test_long_prompts_are_reported(endpoint, tmp_path):
    url, _ = endpoint
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2video",
        "--endpoint-url",
        url,
        "--model",
        "long",
    )
    assert proc.returncode == 0 and "over the model's 512-token conditioning limit" in proc.stderr
    assert len(json.loads((tmp_path / "out.json").read_text())[0]["background_setting"]) > 1000  # not cut


def test_self_upsampling_runs_end_to_end_on_tiny(tmp_path):
    proc = upsample(
        tmp_path,
        "--output",
        str(tmp_path / "out.json"),
        "--mode",
        "text2image",
        "--self",
        "--checkpoint",
        "tiny",
        "--max-tokens",
        "16",
    )
    # Random weights never produce the structured JSON: the validation path runs, retries, then says so.
    assert proc.returncode == 2, proc.stderr
    assert "no valid JSON in 3 attempts" in proc.stderr
